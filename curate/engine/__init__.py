"""Execution engines for the per-image stages: the local process pool (default) or Ray."""
