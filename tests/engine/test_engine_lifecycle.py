"""Abort in every state, failures, validation: every block freed exactly once."""

from __future__ import annotations

import threading

from disagg.engine.api import FinishReason, RequestMode
from disagg.engine.testing import OutputCollector, assert_engine_empty, prompt_of, request


def test_abort_waiting_request(tiny_model, model_impl) -> None:
    from disagg.engine.engine import LLMEngine
    from disagg.engine.testing import engine_config

    eng = LLMEngine(engine_config(tiny_model, model_impl=model_impl))  # not started: waits
    sink = OutputCollector()
    eng.submit(request(prompt_of(20), sink, rid="w", max_tokens=5))
    assert eng.stats().waiting == 1
    eng.abort("w")
    eng.abort("w")
    eng.start()
    sink.wait(["w"])
    assert sink.finish("w") is FinishReason.CANCELLED
    eng.stop()
    assert_engine_empty(eng)


def test_abort_running_request(make_engine) -> None:
    eng = make_engine()
    sink = OutputCollector()
    started = threading.Event()

    def on_output(out) -> None:  # type: ignore[no-untyped-def]
        sink(out)
        started.set()

    eng.submit(request(prompt_of(30), on_output, rid="run", max_tokens=200, ignore_eos=True))
    assert started.wait(30)
    eng.abort("run")
    sink.wait(["run"])
    assert sink.finish("run") is FinishReason.CANCELLED
    assert len(sink.tokens("run")) < 200
    eng.abort("run")  # idempotent


def test_abort_from_callback_and_racing_threads(make_engine) -> None:
    eng = make_engine()
    sink = OutputCollector()

    def on_output(out) -> None:  # type: ignore[no-untyped-def]
        sink(out)
        if out.finish is None and len(sink.tokens(out.request_id)) == 3:
            eng.abort(out.request_id)

    reqs = [request(prompt_of(10 + i, i), on_output, max_tokens=100) for i in range(6)]
    for r in reqs:
        eng.submit(r)
    racers = [threading.Thread(target=eng.abort, args=(reqs[5].request_id,)) for _ in range(3)]
    for t in racers:
        t.start()
    for t in racers:
        t.join()
    sink.wait([r.request_id for r in reqs])
    for r in reqs:
        assert sink.finish(r.request_id) is FinishReason.CANCELLED
        assert [o.finish for o in sink.outputs[r.request_id]].count(FinishReason.CANCELLED) == 1


def test_abort_held_and_imported_kv(make_engine) -> None:
    eng = make_engine()
    sink = OutputCollector()
    eng.submit(request(prompt_of(40), sink, rid="p", mode=RequestMode.PREFILL_ONLY))
    sink.wait(["p"])
    assert eng.stats().held == 1 and eng.held_blocks("p") is not None
    eng.abort("p")
    assert eng.held_blocks("p") is None and eng.stats().held == 0
    assert eng.reserve_import("i", 33) is not None
    eng.abort("i")
    eng.abort("unknown")
    assert eng.release("i") is False
    s = eng.stats()
    assert s.free_blocks == s.total_blocks


def test_step_failure_fails_batch_and_loop_survives(make_engine, reference) -> None:
    eng = make_engine()
    sink = OutputCollector()
    real_run = eng.runner.run
    calls = {"n": 0}

    def flaky(batch):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real_run(batch)

    eng.runner.run = flaky
    bad = request(prompt_of(12, 3), sink, max_tokens=10)
    eng.submit(bad)
    sink.wait([bad.request_id])
    assert sink.finish(bad.request_id) is FinishReason.ERROR
    assert "boom" in (sink.outputs[bad.request_id][-1].error or "")
    good = request(prompt_of(12, 4), sink, max_tokens=10)
    eng.submit(good)
    sink.wait([good.request_id])
    assert sink.tokens(good.request_id) == reference(good.prompt_token_ids, 10)


def test_invalid_requests_error_out(make_engine) -> None:
    eng = make_engine(num_blocks=4)
    sink = OutputCollector()
    cases = {
        "empty": [],
        "too-long": prompt_of(300),
        "bad-id": [5, 100000],
        "too-big-for-pool": prompt_of(70),
    }
    for rid, prompt in cases.items():
        eng.submit(request(prompt, sink, rid=rid, max_tokens=4))
    sink.wait(list(cases))
    for rid in cases:
        assert sink.finish(rid) is FinishReason.ERROR and sink.outputs[rid][-1].error


def test_stop_cancels_active_requests(make_engine) -> None:
    eng = make_engine()
    sink = OutputCollector()
    eng.submit(request(prompt_of(20), sink, rid="s", max_tokens=200, ignore_eos=True))
    eng.stop()
    sink.wait(["s"], timeout=5)
    assert sink.finish("s") is FinishReason.CANCELLED


def test_stats_counts(make_engine) -> None:
    eng = make_engine()
    s = eng.stats()
    assert (s.running, s.waiting, s.held, s.queued_prefill_tokens) == (0, 0, 0, 0)
    assert s.total_blocks == 64


def test_abort_during_forward_is_deferred(make_engine) -> None:
    eng = make_engine()
    sink = OutputCollector()
    real_run = eng.runner.run

    def run_and_abort(batch):  # type: ignore[no-untyped-def]
        for seq in batch.seqs:
            eng.abort(seq.request_id)  # the forward still writes into its blocks
            assert eng.stats().free_blocks < eng.stats().total_blocks
        return real_run(batch)

    eng.runner.run = run_and_abort
    r = request(prompt_of(40), sink, max_tokens=10)
    eng.submit(r)
    sink.wait([r.request_id])
    assert sink.finish(r.request_id) is FinishReason.CANCELLED and sink.tokens(r.request_id) == []
