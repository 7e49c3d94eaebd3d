"""The compiled step's buckets and warm-up (speed is the benchmark's business, not asserted)."""

from __future__ import annotations

from disagg.engine.compile import bucket_for, decode_buckets
from disagg.engine.engine import LLMEngine
from disagg.engine.testing import assert_engine_empty, engine_config


def test_decode_buckets_cover_every_batch_size() -> None:
    assert decode_buckets(64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    assert decode_buckets(1) == (1,)
    assert decode_buckets(5) == (1, 2, 4, 5)
    assert decode_buckets(12) == (1, 2, 4, 8, 12)
    buckets = decode_buckets(64)
    for n in range(1, 65):
        b = bucket_for(n, buckets)
        assert b >= n and b - n < 8
    assert bucket_for(70, buckets) == 70  # beyond the largest: unpadded


def test_warmup_compiles_buckets_smallest_first_within_budget(tiny_model: str) -> None:
    eng = LLMEngine(engine_config(tiny_model, max_num_seqs=8, compile_warmup_s=600))
    eng.start()
    assert sorted(eng.compiler.compiled_s) == [1, 2, 4, 8]
    eng.stop()
    assert_engine_empty(eng)  # the warm-up's scratch block went back
    none = LLMEngine(engine_config(tiny_model, max_num_seqs=8, compile_warmup_s=0))
    none.start()
    assert none.compiler.compiled_s == {}
    none.stop()


def test_compile_off_or_transformers_path_runs_eagerly(tiny_model: str) -> None:
    eager = LLMEngine(engine_config(tiny_model, compile=False))
    assert not eager.compiler.enabled and eager.compiler.decode_fns(3)[1] == 3
    hf = LLMEngine(engine_config(tiny_model, model_impl="transformers"))
    hf.start()
    assert hf.compiler.compiled_s == {}
    hf.stop()


def test_compile_settings_hold_on_the_step_thread(tiny_model: str) -> None:
    """Dynamo's config is per thread: the step thread applies the engine's own
    (a bucket past dynamo's default 8 graphs would otherwise run eagerly, and a
    failing compile would fail the step instead of running it eagerly)."""
    import torch._dynamo.config as dynamo

    from disagg.engine.testing import OutputCollector, prompt_of, request

    seen: list[tuple[int, bool]] = []
    sink = OutputCollector()

    def on_output(out) -> None:  # type: ignore[no-untyped-def]
        seen.append((dynamo.recompile_limit, dynamo.suppress_errors))  # on the engine thread
        sink(out)

    eng = LLMEngine(engine_config(tiny_model, max_num_seqs=4, compile_warmup_s=0))
    eng.start()
    eng.submit(request(prompt_of(5), on_output, rid="c", max_tokens=2))
    sink.wait(["c"])
    eng.stop()
    assert seen and all(limit >= 64 and suppress for limit, suppress in seen), seen
