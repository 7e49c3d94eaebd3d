"""Greedy output of the engine equals transformers generate(do_sample=False), token for token."""

from __future__ import annotations

import threading
import time

import pytest

from disagg.engine.api import FinishReason
from disagg.engine.testing import TINY_MAX_CONTEXT, OutputCollector, prompt_of, request


def test_reference_is_diverse(reference) -> None:
    # A tiny random model that repeats one token would hide KV bugs.
    for n in (1, 16, 50):
        assert len(set(reference(prompt_of(n, n), 32))) >= 4


@pytest.mark.parametrize("prompt_len", [1, 16, 17, 50])
def test_single_request_matches_generate(make_engine, reference, prompt_len: int) -> None:
    eng = make_engine()
    sink = OutputCollector()
    prompt = prompt_of(prompt_len, prompt_len)
    req = request(prompt, sink, max_tokens=40, ignore_eos=False)
    eng.submit(req)
    sink.wait([req.request_id])
    expected = reference(prompt, 40)
    assert len(set(expected)) >= 4
    assert sink.tokens(req.request_id) == expected
    first = sink.outputs[req.request_id][0]
    assert first.queue_ms is not None and first.prefill_ms is not None and first.prefill_ms > 0
    assert all(len(o.token_ids) == 1 for o in sink.outputs[req.request_id])


def test_context_limit_finishes_with_length(make_engine, reference) -> None:
    eng = make_engine()
    sink = OutputCollector()
    prompt = prompt_of(TINY_MAX_CONTEXT - 20, 7)
    req = request(prompt, sink, max_tokens=100)
    eng.submit(req)
    sink.wait([req.request_id])
    got = sink.tokens(req.request_id)
    assert len(got) == 20 and sink.finish(req.request_id) is FinishReason.LENGTH
    assert got == reference(prompt, 20)


def test_many_concurrent_requests_join_and_leave(make_engine, reference) -> None:
    eng = make_engine(max_num_seqs=4, num_blocks=48)
    sink = OutputCollector()
    specs = [(1 + (i * 37) % 90, 5 + (i * 11) % 30) for i in range(14)]
    reqs = [request(prompt_of(n, 100 + i), sink, max_tokens=m) for i, (n, m) in enumerate(specs)]
    for i, r in enumerate(reqs):
        eng.submit(r)
        if i % 4 == 3:
            time.sleep(0.02)  # later arrivals join a running batch
    sink.wait([r.request_id for r in reqs])
    for r, (_, m) in zip(reqs, specs, strict=True):
        assert sink.tokens(r.request_id) == reference(r.prompt_token_ids, m), r.request_id


def test_tiny_pool_forces_preemption(make_engine, reference) -> None:
    eng = make_engine(num_blocks=12, max_num_seqs=8)
    sink = OutputCollector()
    reqs = [request(prompt_of(20, 200 + i), sink, max_tokens=40) for i in range(4)]
    for r in reqs:
        eng.submit(r)
    sink.wait([r.request_id for r in reqs])
    assert eng.num_preemptions > 0
    for r in reqs:
        assert sink.tokens(r.request_id) == reference(r.prompt_token_ids, 40)


def test_prefix_cache_hit(make_engine, reference) -> None:
    eng = make_engine()
    sink = OutputCollector()
    prefix = prompt_of(48, 300)
    a = request([*prefix, 5, 6, 7], sink, max_tokens=12)
    eng.submit(a)
    sink.wait([a.request_id])
    b = request([*prefix, 9, 10], sink, max_tokens=12)
    c = request(a.prompt_token_ids, sink, max_tokens=12)
    for r in (b, c):
        eng.submit(r)
        sink.wait([r.request_id])
    assert sink.outputs[a.request_id][0].cached_tokens == 0
    assert sink.outputs[b.request_id][0].cached_tokens == 48
    assert sink.outputs[c.request_id][0].cached_tokens == 48
    for r in (a, b, c):
        assert sink.tokens(r.request_id) == reference(r.prompt_token_ids, 12)


def test_prefix_cache_disabled(make_engine, reference) -> None:
    eng = make_engine(enable_prefix_cache=False)
    sink = OutputCollector()
    prompt = prompt_of(40, 301)
    reqs = [request(prompt, sink, max_tokens=8) for _ in range(2)]
    for r in reqs:
        eng.submit(r)
        sink.wait([r.request_id])
        assert sink.outputs[r.request_id][0].cached_tokens == 0
        assert sink.tokens(r.request_id) == reference(prompt, 8)


def test_chunked_prefill(make_engine, reference) -> None:
    eng = make_engine(max_num_batched_tokens=16)
    sink = OutputCollector()
    short = request(prompt_of(5, 400), sink, max_tokens=30)
    eng.submit(short)
    long_reqs = [request(prompt_of(n, 401 + n), sink, max_tokens=10) for n in (100, 37)]
    for r in long_reqs:
        eng.submit(r)
    sink.wait([short.request_id] + [r.request_id for r in long_reqs])
    for r in [short, *long_reqs]:
        assert sink.tokens(r.request_id) == reference(r.prompt_token_ids, r.sampling.max_tokens)
    assert sink.outputs[long_reqs[0].request_id][0].prefill_ms > 0


def test_eos_stops_unless_ignored(make_engine, reference) -> None:
    eng = make_engine()
    prompt = prompt_of(30, 500)
    expected = reference(prompt, 20)
    stop_token = expected[5]
    cut = expected.index(stop_token) + 1
    eng._eos = frozenset({stop_token})  # pretend the model's EOS is a token it emits
    sink = OutputCollector()
    stop = request(prompt, sink, max_tokens=20)
    keep = request(prompt, sink, max_tokens=20, ignore_eos=True)
    for r in (stop, keep):
        eng.submit(r)
    sink.wait([stop.request_id, keep.request_id])
    assert sink.tokens(stop.request_id) == expected[:cut]
    assert sink.finish(stop.request_id) is FinishReason.STOP
    assert sink.tokens(keep.request_id) == expected
    assert sink.finish(keep.request_id) is FinishReason.LENGTH


def test_submit_from_many_threads(make_engine, reference) -> None:
    eng = make_engine(max_num_seqs=16)
    sink = OutputCollector()
    reqs = [request(prompt_of(3 + i, 600 + i), sink, max_tokens=6) for i in range(12)]
    threads = [threading.Thread(target=eng.submit, args=(r,)) for r in reqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sink.wait([r.request_id for r in reqs])
    for r in reqs:
        assert sink.tokens(r.request_id) == reference(r.prompt_token_ids, 6)


def test_chunked_prefill_after_prefix_hit(make_engine, reference) -> None:
    eng = make_engine(max_num_batched_tokens=16)
    sink = OutputCollector()
    prefix = prompt_of(32, 900)
    a = request([*prefix, 4], sink, max_tokens=4)
    eng.submit(a)
    sink.wait([a.request_id])
    b = request([*prefix, *prompt_of(40, 901)], sink, max_tokens=15)
    eng.submit(b)
    sink.wait([b.request_id])
    assert sink.outputs[b.request_id][0].cached_tokens == 32
    assert sink.tokens(b.request_id) == reference(b.prompt_token_ids, 15)


def test_long_and_short_decodes_attend_in_length_groups(
    make_engine, reference, monkeypatch
) -> None:
    # A 200-token context decoding beside 3-token ones: the runner splits them into length
    # groups (else every short row pads to 13 blocks); the tokens must not change. Run on the
    # torch decode attention: the C++ kernel reads each row's own length and needs no groups
    # (test_decode_kernel.py).
    from disagg.engine import attention, runner

    splits: list[int] = []

    def spy(num_blocks: list[int], min_split_blocks: int = 8) -> list[list[int]]:
        groups = attention.group_by_length(num_blocks, min_split_blocks)
        splits.append(len(groups))
        return groups

    monkeypatch.setattr(runner, "group_by_length", spy)
    eng = make_engine(num_blocks=64, decode_kernel="torch")
    sink = OutputCollector()
    specs = [(200, 30), (3, 30), (2, 25), (150, 20), (4, 30), (40, 30)]
    reqs = [request(prompt_of(n, 300 + i), sink, max_tokens=m) for i, (n, m) in enumerate(specs)]
    for r in reqs:
        eng.submit(r)
    sink.wait([r.request_id for r in reqs])
    assert max(splits) >= 2, splits
    for r, (_, m) in zip(reqs, specs, strict=True):
        assert sink.tokens(r.request_id) == reference(r.prompt_token_ids, m), r.request_id
