"""Framework-neutral parts: the fold math, layouts, decisions, results, options and file handling."""
