"""Verification: feeds (inputs.py), runners (runners.py) and the judgement (compare.py)."""
