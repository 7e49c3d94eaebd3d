"""The engine's own Llama-family forward: greedy-equal to transformers on each family
and RoPE variant it covers, compiled and eager; the rest falls back to transformers."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch

from disagg.engine.engine import LLMEngine
from disagg.engine.models.layers import rope_from_config
from disagg.engine.testing import (
    OutputCollector,
    assert_engine_empty,
    engine_config,
    greedy_reference,
    make_tiny_model,
    prompt_of,
    request,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 10000.0,
}
CONFIGS = {
    # Qwen2: q/k/v biases (random, see make_tiny_model), tied embeddings.
    "qwen2-bias-tied": ("qwen2", {"tie_word_embeddings": True}),
    # Mistral-shaped, sliding window honoured: prompts + output exceed 24 tokens.
    "mistral-window": ("mistral", {"sliding_window": 24}),
    # Qwen2 with the window on its upper layer only (layer_types: full, sliding).
    "qwen2-window-layer": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 24, "max_window_layers": 1},
    ),
    "llama3-rope": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "linear-rope-biases": (
        "llama",
        {
            "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
            "attention_bias": True,
            "mlp_bias": True,
        },
    ),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    family, overrides = CONFIGS[request.param]
    return make_tiny_model(str(tmp_path_factory.mktemp(request.param)), family, 1, **overrides)


@pytest.fixture(
    params=[(True, "torch"), (False, "torch"), (False, "auto")],
    ids=["compiled", "eager", "kernel"],
)
def native_engine(request: pytest.FixtureRequest, family_model: str) -> Iterator[LLMEngine]:
    # A 32-token budget: long prompts prefill in chunks, beside running decodes. Decode
    # attention: compiled over the pool, eager gathered, or the C++ kernel (engine/kernels).
    compiled, kernel = request.param
    cfg = engine_config(
        family_model,
        model_impl="native",
        compile=compiled,
        decode_kernel=kernel,
        max_num_batched_tokens=32,
    )
    eng = LLMEngine(cfg)
    assert eng.model_impl == "native"
    eng.start()
    yield eng
    eng.stop()
    assert_engine_empty(eng)


def test_greedy_equals_generate(native_engine: LLMEngine, family_model: str) -> None:
    ref = greedy_reference(family_model)
    sink = OutputCollector()
    # Batched decodes of mixed lengths, chunked prefills, chunks after a cached prefix.
    prefix = prompt_of(40, 11)
    reqs = [request(prompt_of(n, n), sink, max_tokens=30) for n in (1, 9, 33, 70)]
    for r in reqs:
        native_engine.submit(r)
    sink.wait([r.request_id for r in reqs])
    tail = [request([*prefix, *prompt_of(k, 12 + k)], sink, max_tokens=20) for k in (1, 20)]
    for r in tail:  # one after the other: the second hits the first's cached blocks
        native_engine.submit(r)
        sink.wait([r.request_id])
    assert sink.outputs[tail[1].request_id][0].cached_tokens == 32
    for r in [*reqs, *tail]:
        expected = ref(r.prompt_token_ids, r.sampling.max_tokens)
        assert len(set(expected)) >= 4, "the reference repeats itself: the test proves nothing"
        assert sink.tokens(r.request_id) == expected, r.request_id


def test_sliding_window_changes_the_output(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # The window is honoured, not merely harmless: with it off the same weights answer otherwise.
    windowed = make_tiny_model(str(tmp_path / "w"), "mistral", 1, sliding_window=24)
    full = make_tiny_model(str(tmp_path / "f"), "mistral", 1, sliding_window=None)
    prompt = prompt_of(70, 70)
    assert greedy_reference(windowed)(prompt, 20) != greedy_reference(full)(prompt, 20)


@pytest.mark.parametrize(
    "params",
    [
        {"rope_type": "default", "rope_theta": 100000.0},
        {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        LLAMA3_ROPE,
    ],
)
def test_rope_frequencies_equal_transformers(params: dict) -> None:  # type: ignore[type-arg]
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(head_dim=64, hidden_size=576, num_attention_heads=9, rope_parameters=params)
    kind = params["rope_type"]
    if kind == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        expected, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[kind](cfg, torch.device("cpu"))
    assert torch.equal(rope_from_config(params, 64), expected)


def test_uncovered_model_falls_back_to_transformers_logged_once(
    tiny_model, tmp_path, caplog
) -> None:  # type: ignore[no-untyped-def]
    dynamic = make_tiny_model(
        str(tmp_path / "dyn"),
        "llama",
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    )
    with caplog.at_level(logging.WARNING, logger="disagg.engine.model_loader"):
        engines = [LLMEngine(engine_config(dynamic)) for _ in range(2)]
    assert [e.model_impl for e in engines] == ["transformers", "transformers"]
    assert sum("rope_type 'dynamic'" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(ValueError, match="dynamic"):
        LLMEngine(engine_config(dynamic, model_impl="native"))
    assert LLMEngine(engine_config(tiny_model, model_impl="transformers")).model_impl == (
        "transformers"
    )
