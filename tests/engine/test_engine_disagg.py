"""The disaggregated path: PREFILL_ONLY on A, KV bytes moved, DECODE on B."""

from __future__ import annotations

from disagg.engine.api import FinishReason, RequestMode
from disagg.engine.testing import OutputCollector, prompt_of, request


def _transfer(src, dst, rid: str) -> None:  # type: ignore[no-untyped-def]
    held = src.held_blocks(rid)
    assert held is not None
    blocks, num_tokens = held
    dst_blocks = dst.reserve_import(rid, num_tokens)
    assert dst_blocks is not None and len(dst_blocks) == len(blocks)
    for layer in range(src.info.layout.num_layers):
        k, v = src.read_kv(blocks, layer)
        assert len(k) == len(blocks) * src.info.layout.bytes_per_block_per_layer
        dst.write_kv(dst_blocks, layer, k, v)
    assert src.release(rid) is True
    assert src.release(rid) is False


def test_prefill_then_decode_equals_generate(make_engine, reference) -> None:
    a = make_engine()
    b = make_engine(num_blocks=40)
    sink = OutputCollector()
    for n in (1, 16, 45):
        prompt = prompt_of(n, 700 + n)
        rid = f"pd-{n}"
        a.submit(request(prompt, sink, rid=rid, mode=RequestMode.PREFILL_ONLY, max_tokens=20))
        sink.wait([rid])
        (out,) = sink.outputs[rid]
        assert out.finish is FinishReason.PREFILLED and len(out.token_ids) == 1
        assert a.stats().held == 1
        _transfer(a, b, rid)
        sink2 = OutputCollector()
        b.submit(
            request(
                prompt,
                sink2,
                rid=rid,
                mode=RequestMode.DECODE,
                first_token_id=out.token_ids[0],
                max_tokens=20,
            )
        )
        sink2.wait([rid])
        got = [out.token_ids[0], *sink2.tokens(rid)]
        assert got == reference(prompt, 20)
        assert sink2.outputs[rid][0].prefill_ms == 0
        assert sink2.finish(rid) is FinishReason.LENGTH


def test_decode_first_token_edge_cases(make_engine) -> None:
    eng = make_engine()
    sink = OutputCollector()
    prompt = prompt_of(10, 1)
    eos = eng.info.eos_token_ids[0]
    cases = {"eos": (eos, 5, FinishReason.STOP), "one": (7, 1, FinishReason.LENGTH)}
    for rid, (first, max_tokens, reason) in cases.items():
        assert eng.reserve_import(rid, len(prompt)) is not None
        eng.submit(
            request(
                prompt,
                sink,
                rid=rid,
                mode=RequestMode.DECODE,
                first_token_id=first,
                max_tokens=max_tokens,
            )
        )
        sink.wait([rid])
        assert sink.tokens(rid) == [] and sink.finish(rid) is reason


def test_decode_without_import_is_an_error(make_engine) -> None:
    eng = make_engine()
    sink = OutputCollector()
    eng.submit(request([5, 6], sink, rid="x", mode=RequestMode.DECODE, first_token_id=3))
    sink.wait(["x"])
    assert sink.finish("x") is FinishReason.ERROR and sink.outputs["x"][-1].error
    eng.reserve_import("y", 3)
    eng.submit(request([5, 6], sink, rid="y", mode=RequestMode.DECODE, first_token_id=3))
    sink.wait(["y"])
    assert sink.finish("y") is FinishReason.ERROR  # token count mismatch; import freed


def test_reserve_import_refuses_when_full(make_engine) -> None:
    eng = make_engine(num_blocks=4)
    assert eng.reserve_import("a", 16 * 3) is not None
    assert eng.reserve_import("b", 32) is None
    assert eng.stats().free_blocks == 1
    assert eng.release("a") is True
    assert eng.stats().free_blocks == 4


def test_read_write_kv_roundtrip(make_engine) -> None:
    eng = make_engine(num_blocks=8)
    blocks = eng.reserve_import("r", 40)
    n = eng.info.layout.bytes_per_block_per_layer * len(blocks)
    k, v = bytes(range(256)) * (n // 256), bytes(reversed(range(256))) * (n // 256)
    eng.write_kv(blocks, 1, k, v)
    assert eng.read_kv(blocks, 1) == (k, v)
    assert eng.read_kv(blocks[1:2], 1)[0] == k[n // 3 : 2 * n // 3]
    eng.release("r")


def test_decode_side_preemption_recomputes_imported_prompt(make_engine, reference) -> None:
    a = make_engine()
    b = make_engine(num_blocks=10)
    prompts = {f"pre-{i}": prompt_of(20, 800 + i) for i in range(3)}
    firsts = {}
    sink = OutputCollector()
    for rid, prompt in prompts.items():
        a.submit(request(prompt, sink, rid=rid, mode=RequestMode.PREFILL_ONLY))
        sink.wait([rid])
        firsts[rid] = sink.tokens(rid)[0]
        _transfer(a, b, rid)
    sink2 = OutputCollector()
    for rid, prompt in prompts.items():
        b.submit(
            request(
                prompt,
                sink2,
                rid=rid,
                mode=RequestMode.DECODE,
                first_token_id=firsts[rid],
                max_tokens=40,
            )
        )
    sink2.wait(list(prompts))
    assert b.num_preemptions > 0
    for rid, prompt in prompts.items():
        assert [firsts[rid], *sink2.tokens(rid)] == reference(prompt, 40)


def test_handoff_between_model_paths(tiny_model, reference) -> None:  # type: ignore[no-untyped-def]
    """The pool layout is the same on both paths: KV prefilled by one decodes on the other."""
    from disagg.engine.engine import LLMEngine
    from disagg.engine.testing import assert_engine_empty, engine_config

    engines = {
        impl: LLMEngine(engine_config(tiny_model, model_impl=impl))
        for impl in ("native", "transformers")
    }
    for eng in engines.values():
        eng.start()
    try:
        for src, dst in (("native", "transformers"), ("transformers", "native")):
            a, b = engines[src], engines[dst]
            prompt, rid, sink = prompt_of(37, 7), f"{src}-to-{dst}", OutputCollector()
            a.submit(request(prompt, sink, rid=rid, mode=RequestMode.PREFILL_ONLY, max_tokens=16))
            sink.wait([rid])
            first = sink.tokens(rid)[0]
            _transfer(a, b, rid)
            sink2 = OutputCollector()
            b.submit(
                request(
                    prompt,
                    sink2,
                    rid=rid,
                    mode=RequestMode.DECODE,
                    first_token_id=first,
                    max_tokens=16,
                )
            )
            sink2.wait([rid])
            assert [first, *sink2.tokens(rid)] == reference(prompt, 16)
    finally:
        for eng in engines.values():
            eng.stop()
            assert_engine_empty(eng)
