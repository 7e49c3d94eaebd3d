from __future__ import annotations

import pytest
import torch

from disagg.engine.api import MAX_TOP_K, FinishReason, SamplingParams
from disagg.engine.sampler import make_generator, sample
from disagg.engine.testing import OutputCollector, prompt_of, request


def test_greedy_is_argmax() -> None:
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0)] * 3
    assert sample(logits, params, [None] * 3) == logits.argmax(-1).tolist()


def test_top_k_and_top_p_restrict_support() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, -10.0, -10.0]] * 200)
    for params, allowed in (
        (SamplingParams(temperature=1.0, top_k=2, seed=1), {0, 1}),
        (SamplingParams(temperature=1.0, top_k=1, seed=1), {0}),
        (SamplingParams(temperature=1.0, top_p=0.5, seed=1), {0}),
        (SamplingParams(temperature=1.0, top_p=0.8, seed=1), {0, 1}),
    ):
        gen = make_generator(params)
        got = set(sample(logits, [params] * 200, [gen] * 200))
        assert got == allowed, params


def test_seeded_rows_independent_of_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    p = SamplingParams(temperature=0.8, top_p=0.9, seed=42)
    alone = sample(logits[2:3], [p], [make_generator(p)])
    others = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0),
        p,
        SamplingParams(temperature=2.0),
    ]
    mixed = sample(logits, others, [make_generator(q) for q in others])
    assert mixed[2] == alone[0]


def test_seeded_engine_output_reproducible_across_batches(make_engine) -> None:
    eng = make_engine(max_num_seqs=8)
    prompt = prompt_of(20, 9)
    params = {"temperature": 0.9, "top_k": 50, "top_p": 0.95, "seed": 1234, "max_tokens": 24}
    sink = OutputCollector()
    alone = request(prompt, sink, **params)
    eng.submit(alone)
    sink.wait([alone.request_id])
    crowd = [request(prompt_of(5 + i, i), sink, temperature=1.0, max_tokens=30) for i in range(5)]
    again = request(prompt, sink, **params)
    for r in [*crowd[:3], again, *crowd[3:]]:
        eng.submit(r)
    sink.wait([again.request_id] + [r.request_id for r in crowd])
    assert sink.tokens(again.request_id) == sink.tokens(alone.request_id)
    assert len(set(sink.tokens(alone.request_id))) > 1
    for r in crowd:  # unseeded: still valid tokens, right count
        toks = sink.tokens(r.request_id)
        assert all(0 <= t < eng.info.vocab_size for t in toks)
        assert len(toks) == 30 or toks[-1] in eng.info.eos_token_ids


def test_seeded_output_reproducible_across_engines_and_batches(make_engine) -> None:
    """Same seed -> same tokens in a fresh engine (another run) and whatever shares the batch."""
    params = {"temperature": 1.0, "top_p": 0.9, "seed": 77, "max_tokens": 20, "ignore_eos": True}
    prompt = prompt_of(12, 3)
    runs = []
    for crowd_size in (0, 3, 6):  # a fresh engine each time, a different batch each time
        eng = make_engine(max_num_seqs=8)
        sink = OutputCollector()
        crowd = [
            request(prompt_of(4 + 3 * i, 50 + i), sink, temperature=0.7, seed=i, max_tokens=25)
            for i in range(crowd_size)
        ]
        mine = request(prompt, sink, **params)
        for r in [*crowd[: crowd_size // 2], mine, *crowd[crowd_size // 2 :]]:
            eng.submit(r)
        sink.wait([mine.request_id] + [r.request_id for r in crowd])
        runs.append(sink.tokens(mine.request_id))
        eng.stop()
    assert runs[0] == runs[1] == runs[2]
    assert len(runs[0]) == 20 and len(set(runs[0])) > 1
    other = make_engine()
    sink = OutputCollector()
    diff = request(prompt, sink, **{**params, "seed": 78})
    other.submit(diff)
    sink.wait([diff.request_id])
    assert sink.tokens(diff.request_id) != runs[0]  # the seed matters


def test_tiny_temperature_is_greedy_not_an_index_error() -> None:
    # temperature=1e-40 used to overflow every logit to inf: NaN probabilities, index -1.
    torch.manual_seed(1)
    logits = torch.randn(4, 50)
    params = [
        SamplingParams(temperature=1e-40, seed=1),
        SamplingParams(temperature=0.8, seed=2),
        SamplingParams(temperature=0),
        SamplingParams(temperature=1e-6, top_k=3, top_p=0.5, seed=3),
    ]
    got = sample(logits, params, [make_generator(p) for p in params])
    greedy = logits.argmax(-1).tolist()
    assert [got[0], got[2], got[3]] == [greedy[0], greedy[2], greedy[3]]
    assert 0 <= got[1] < 50
    assert make_generator(params[0]) is None  # greedy rows draw nothing


def test_non_finite_logits_never_index_out_of_range() -> None:
    logits = torch.randn(5, 50)
    logits[0] = float("nan")
    logits[1, 3] = float("inf")
    logits[2] = float("-inf")
    logits[3, ::2] = float("nan")
    logits[4, :] = float("-inf")
    logits[4, 7] = 1.0
    params = [
        SamplingParams(temperature=1.0, top_p=0.9, top_k=k, seed=i)
        for i, k in enumerate((0, 5, 0, 10, 0))
    ]
    got = sample(logits, params, [make_generator(p) for p in params])
    assert all(0 <= t < 50 for t in got)
    assert got[1] == 3 and got[4] == 7
    assert got[3] % 2 == 1  # NaN entries count as -inf: never drawn


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"temperature": -1.0},
        {"top_p": float("nan")},
        {"top_p": float("inf")},
        {"top_k": -1},
        {"top_k": MAX_TOP_K + 1},
    ],
)
def test_sampling_params_reject_non_finite_and_absurd_values(bad: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_tiny_finite_temperature_and_large_top_k_are_valid() -> None:
    SamplingParams(temperature=1e-40)
    SamplingParams(top_k=MAX_TOP_K)


def test_a_request_whose_sampling_fails_fails_alone(make_engine, reference, monkeypatch) -> None:
    from disagg.engine import engine as engine_module

    real = engine_module.sample

    def flaky(logits, params, generators):  # type: ignore[no-untyped-def]
        if any(p.top_k == 7 for p in params):  # the marked request's row
            raise RuntimeError("index -1 is out of bounds for dimension 1 with size 512")
        return real(logits, params, generators)

    monkeypatch.setattr(engine_module, "sample", flaky)
    eng = make_engine()
    sink = OutputCollector()
    good = [request(prompt_of(10 + i, 40 + i), sink, max_tokens=8) for i in range(3)]
    bad = request(prompt_of(12, 99), sink, max_tokens=8, temperature=0.7, top_k=7, seed=1)
    for r in [good[0], bad, *good[1:]]:  # one prefill step: they share the batch
        eng.submit(r)
    sink.wait([r.request_id for r in [bad, *good]])
    assert sink.finish(bad.request_id) is FinishReason.ERROR
    assert "out of bounds" in (sink.outputs[bad.request_id][-1].error or "")
    for r in good:
        assert sink.tokens(r.request_id) == reference(r.prompt_token_ids, 8)


def test_a_request_whose_stop_handling_fails_fails_alone(make_engine, reference) -> None:
    eng = make_engine()
    sink = OutputCollector()
    reqs = [request(prompt_of(20, 60 + i), sink, max_tokens=10) for i in range(3)]
    victim = reqs[1].request_id
    real = eng._finish_reason

    def broken(seq, token):  # type: ignore[no-untyped-def]
        if seq.request_id == victim and seq.num_generated == 3:
            raise KeyError("stop strings table")
        return real(seq, token)

    eng._finish_reason = broken
    for r in reqs:
        eng.submit(r)
    sink.wait([r.request_id for r in reqs])
    assert sink.finish(victim) is FinishReason.ERROR
    assert len(sink.tokens(victim)) == 2
    for r in (reqs[0], reqs[2]):
        assert sink.tokens(r.request_id) == reference(r.prompt_token_ids, 10)
