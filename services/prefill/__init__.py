"""Prefill worker: prompts into the paged KV pool; KV handles in Redis; blocks served to decode."""
