"""Framework-neutral verification: input feeds (inputs.py) and the judgement (compare.py)."""
