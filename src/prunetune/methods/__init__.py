"""Whole methods built from the parts in pruning/, tuning/ and data/ (one file per method)."""
