"""Model-free mock workers: the real servicers over an engine that spends time per a cost model."""
