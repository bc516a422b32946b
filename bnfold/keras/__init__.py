"""The Keras 3 frontend: the layer graph, the fold plan, the rebuild, files, export, verifier.

Every module here imports keras; nothing outside this package does.
"""
