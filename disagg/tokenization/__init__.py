"""Prompt rendering, validation and incremental detokenization (no I/O)."""
