from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from disagg.engine.engine import LLMEngine
from disagg.engine.testing import assert_engine_empty, engine_config, make_tiny_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def reference(tiny_model_dir: str):  # type: ignore[no-untyped-def]
    """greedy(prompt, n) -> generate(do_sample=False) new tokens of the tiny model (memoized)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    memo: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def greedy(prompt: list[int], max_new_tokens: int) -> list[int]:
        key = (tuple(prompt), max_new_tokens)
        if key not in memo:
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=0,
            )
            memo[key] = out[0, len(prompt) :].tolist()
        return memo[key]

    return greedy


@pytest.fixture
def make_engine(tiny_model_dir: str) -> Iterator:  # type: ignore[type-arg]
    """make_engine(**EngineConfig overrides) -> started LLMEngine; asserts empty pools at teardown."""
    engines: list[LLMEngine] = []

    def factory(**kw) -> LLMEngine:  # type: ignore[no-untyped-def]
        eng = LLMEngine(engine_config(tiny_model_dir, **kw))
        eng.start()
        engines.append(eng)
        return eng

    yield factory
    for eng in engines:
        eng.stop()
        assert_engine_empty(eng)
