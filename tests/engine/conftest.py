from __future__ import annotations

from collections.abc import Iterator

import pytest

from disagg.engine.engine import LLMEngine
from disagg.engine.testing import GreedyReference, assert_engine_empty, engine_config


@pytest.fixture(scope="session")
def reference(tiny_reference: GreedyReference) -> GreedyReference:
    """The tiny model's greedy reference under the name the engine tests use."""
    return tiny_reference


@pytest.fixture
def make_engine(tiny_model: str) -> Iterator:  # type: ignore[type-arg]
    """make_engine(**EngineConfig overrides) -> started LLMEngine; asserts empty pools at teardown."""
    engines: list[LLMEngine] = []

    def factory(**kw) -> LLMEngine:  # type: ignore[no-untyped-def]
        eng = LLMEngine(engine_config(tiny_model, **kw))
        eng.start()
        engines.append(eng)
        return eng

    yield factory
    for eng in engines:
        eng.stop()
        assert_engine_empty(eng)
