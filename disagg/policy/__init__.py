"""Routing policy: pure functions of a snapshot of worker state (no I/O)."""
