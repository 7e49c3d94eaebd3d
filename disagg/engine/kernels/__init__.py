"""Hand-written kernels the engine builds at first use (see each module)."""
