"""The simulator against queueing theory and against the direction each knob should move."""

from __future__ import annotations

import statistics

import pytest

from disagg.plan import search
from disagg.plan.sim import Cluster, percentile, simulate
from disagg.plan.workload import SimRequest, parse_mix, poisson
from tests.plan.factories import mix, profile, same


def test_prefill_queue_matches_md1_waiting_time() -> None:
    """One prefill worker, one prompt per step, deterministic service S, Poisson arrivals:
    M/D/1, mean wait rho*S / (2(1-rho)) (Pollaczek-Khinchine)."""
    p = profile(prefill_ms_per_token=0.0, prefill_base_ms=10.0, chunk=1000)
    rate = 60.0  # rho = 0.6
    reqs = poisson(mix((1000, 1000), (1, 1)), rate, 20_000, seed=1)
    res = simulate(same(p), Cluster(1, 1), reqs)
    s_ms, rho = 10.0, rate * 0.010
    expected = s_ms + rho * s_ms / (2 * (1 - rho))  # 17.5 ms
    assert statistics.fmean(res.ttft_ms) == pytest.approx(expected, rel=0.05)


def test_no_load_latency_is_the_profile() -> None:
    p = profile()
    res = simulate(same(p), Cluster(1, 1), [SimRequest(0.0, 1000, 5)])
    assert res.ttft_ms[0] == pytest.approx(p.prefill_ms(1000))
    # Token 2 after the handoff and one decode step, then one step per token.
    assert res.itl_ms[0] == pytest.approx(p.transfer_ms(1000) + p.decode_ms(1, 1001))
    assert res.itl_ms[1:] == pytest.approx([p.decode_ms(1, 1000 + k) for k in (2, 3, 4)])


def test_more_decode_workers_lower_itl() -> None:
    p = profile(step_ms=5.0, step_ms_per_seq=1.0)
    reqs = poisson(mix((100, 200), (50, 100)), 40.0, 600, seed=2)
    itl = [percentile(simulate(same(p), Cluster(1, d), reqs).itl_ms, 50) for d in (1, 2, 4)]
    assert itl[0] > itl[1] > itl[2]


def test_collocated_long_prompts_stall_decoding_and_disaggregation_does_not() -> None:
    p = profile(prefill_ms_per_token=0.1)  # a 2,000-token prompt: a 205 ms step
    reqs = poisson(parse_mix("0.5:2000-2000:4-4,0.5:50-50:100-100"), 2.0, 200, seed=3)
    colloc = simulate(same(p), Cluster(0, 2), reqs)
    disagg = simulate(same(p), Cluster(1, 1), reqs)
    assert max(colloc.itl_ms) > 200  # a decode step that carried a whole long prompt
    assert max(disagg.itl_ms) < 50


def test_prefill_dispatch_sends_short_prompts_ahead_of_a_waiting_long_one() -> None:
    """The scheduler's dispatch queue: shortest expected prefill first. A long prompt that
    arrives while another is prefilling waits behind the chats that come after it; with
    every prompt handed to the engine at once (FIFO), the chats wait behind it instead."""
    p = profile(prefill_ms_per_token=1.0, prefill_base_ms=0.0)  # 1,000 tokens: 1 s
    reqs = [SimRequest(0.0, 1000, 2), SimRequest(0.1, 1000, 2)]
    reqs += [SimRequest(0.2 + 0.1 * k, 10, 2) for k in range(4)]
    sjf = simulate(same(p), Cluster(1, 1, dispatch_depth=1), reqs)
    fifo = simulate(same(p), Cluster(1, 1, dispatch_depth=100), reqs)
    chats = range(2, 6)
    assert max(sjf.ttft_ms[i] for i in chats) < 1000  # right after the first long prompt
    assert min(fifo.ttft_ms[i] for i in chats) > 1000  # after the second one's step
    # The long one finishes when it would have anyway: the chats' 40 ms are spent either way.
    assert sjf.ttft_ms[1] == pytest.approx(fifo.ttft_ms[1]) == pytest.approx(1940.0)
    with pytest.raises(ValueError):
        Cluster(1, 1, dispatch_depth=0)


def test_padded_decode_costs_the_longest_context() -> None:
    """One long context among short ones: a padded batch pays its length for every row."""
    import dataclasses

    p = dataclasses.replace(
        profile(),
        decode=tuple((b, c, 1.0 + 0.01 * b * c / 128) for c in (128, 4096) for b in (1, 64)),
    )
    reqs = [SimRequest(0.0, 4000, 400)] + [SimRequest(0.001 * i, 100, 20) for i in range(1, 16)]
    mean = simulate(same(p), Cluster(1, 1), reqs)
    padded = simulate(same(dataclasses.replace(p, decode_context="max")), Cluster(1, 1), reqs)
    assert max(padded.itl_ms) > 2 * max(mean.itl_ms)
    with pytest.raises(ValueError):
        dataclasses.replace(p, decode_context="median")


def test_simulation_is_deterministic_and_finishes_every_request() -> None:
    p = profile()
    reqs = poisson(parse_mix("0.3:500-900:10-20,0.7:20-60:30-80"), 30.0, 300, seed=4)
    a = simulate(same(p), Cluster(1, 2, 128), reqs)
    b = simulate(same(p), Cluster(1, 2, 128), reqs)
    assert a.ttft_ms == b.ttft_ms and a.itl_ms == b.itl_ms
    assert all(t > 0 for t in a.ttft_ms)
    assert all((t is None) == (r.output < 2) for t, r in zip(a.tpot_ms, reqs, strict=True))


def test_goodput_is_monotone_in_the_slo() -> None:
    p = profile()
    arrivals = search.mix_arrivals(mix((500, 1000), (20, 60)), 300)
    loose = search.goodput(same(p), Cluster(1, 1), arrivals, search.Slo(500, 30))
    tight = search.goodput(same(p), Cluster(1, 1), arrivals, search.Slo(100, 30))
    assert loose >= tight > 0


def test_recommendation_moves_to_more_prefill_when_prompts_get_longer() -> None:
    p = profile(prefill_ms_per_token=0.02, step_ms=8.0, step_ms_per_seq=0.1)
    slo = search.Slo(ttft_ms=400, tpot_ms=20)

    def prefill_share(prompt: tuple[int, int]) -> float:
        arrivals = search.mix_arrivals(mix(prompt, (100, 200)), 300)
        rec = search.recommend(same(p), 6, arrivals, slo, thresholds=(0,), max_sim_gpus=6)
        assert rec.best.goodput_rps > 0
        return rec.best.cluster.prefill / 6

    assert prefill_share((2000, 4000)) > prefill_share((50, 150))
