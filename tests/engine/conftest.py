from __future__ import annotations

from collections.abc import Iterator

import pytest

from disagg.engine.engine import LLMEngine
from disagg.engine.testing import GreedyReference, assert_engine_empty, engine_config


@pytest.fixture(scope="session")
def reference(tiny_reference: GreedyReference) -> GreedyReference:
    """The tiny model's greedy reference under the name the engine tests use."""
    return tiny_reference


@pytest.fixture(params=["native", "transformers"])
def model_impl(request: pytest.FixtureRequest) -> str:
    """Every engine test runs on both model paths: the engine's own forward (the
    default, compiled) and transformers' modules behind the paged attention interface."""
    return str(request.param)


@pytest.fixture
def make_engine(tiny_model: str, model_impl: str) -> Iterator:  # type: ignore[type-arg]
    """make_engine(**EngineConfig overrides) -> started LLMEngine; asserts empty pools at teardown."""
    engines: list[LLMEngine] = []

    def factory(**kw) -> LLMEngine:  # type: ignore[no-untyped-def]
        eng = LLMEngine(engine_config(tiny_model, **{"model_impl": model_impl, **kw}))
        assert eng.model_impl == kw.get("model_impl", model_impl)
        eng.start()
        engines.append(eng)
        return eng

    yield factory
    for eng in engines:
        eng.stop()
        assert_engine_empty(eng)
