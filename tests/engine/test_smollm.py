"""The real default model: GGUF -> cached safetensors, engine greedy == generate."""

from __future__ import annotations

import os

import pytest

from disagg.engine.api import FinishReason
from disagg.engine.model_loader import resolve_model
from disagg.engine.testing import OutputCollector, assert_engine_empty, greedy_reference, request

pytestmark = pytest.mark.smollm


def test_default_model_greedy_matches_generate(model_impl: str) -> None:
    from disagg.engine.config import EngineConfig
    from disagg.engine.engine import LLMEngine

    path = resolve_model("")
    assert os.path.exists(os.path.join(path, "model.safetensors"))
    assert resolve_model("") == path  # cached: no second conversion
    eng = LLMEngine(EngineConfig(num_blocks=64, threads=2, model_impl=model_impl))
    assert eng.model_impl == model_impl
    assert eng.info.name == "SmolLM2-135M-Instruct" and eng.info.eos_token_ids
    ref = greedy_reference(path)
    tok = eng.tokenizer
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": "What is the capital of France?"}],
            add_generation_prompt=True,
            tokenize=True,
        ),
        tok("The quick brown fox")["input_ids"],
    ]
    prompts = [list(p["input_ids"]) if hasattr(p, "keys") else list(p) for p in prompts]
    sink = OutputCollector()
    reqs = [request(p, sink, max_tokens=32) for p in prompts]
    eng.start()
    try:
        for r in reqs:
            eng.submit(r)
        sink.wait([r.request_id for r in reqs], timeout=120)
    finally:
        eng.stop()
    for r in reqs:
        assert sink.tokens(r.request_id) == ref(r.prompt_token_ids, 32)
        assert sink.finish(r.request_id) in (FinishReason.STOP, FinishReason.LENGTH)
    assert_engine_empty(eng)
