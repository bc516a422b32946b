"""The PyTorch frontend: captures (fx, torch.export, module hooks), fold rules, files, export, verifier.

Every module here imports torch; nothing outside this package does.
"""
