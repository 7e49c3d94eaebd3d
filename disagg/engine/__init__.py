"""The inference engine inside each worker: paged KV pool, continuous batching, sampling.

Services use ``disagg.engine.api`` (the contract) and ``disagg.engine.engine.LLMEngine``.
"""
