"""The routing policy on constructed snapshots: each rule, ties, admission at the boundary."""

from __future__ import annotations

import pytest

from disagg.policy.cost import CostModel, DecodeCost
from disagg.policy.routing import Load, NoWorker, PolicyConfig, decide
from tests.scheduler.factories import decode, prefill, request, snap

# Flat prior: 1 ms per prefill + 0.1 ms per token; no transfer cost unless a test sets it.
PRIOR = CostModel(base_ms=1.0, per_token_ms=0.1)
CFG = PolicyConfig(prefill_prior=PRIOR, transfer_ms_per_token=0.0)


def test_prefill_earliest_finish_by_queued_tokens() -> None:
    s = snap(prefill("p0", queued=500), prefill("p1", queued=100), decode("d0"))
    d = decide(s, request(200), CFG)
    assert d.prefill is not None and d.prefill.worker_id == "p1"
    assert d.reason == "earliest finish"
    # 1 ms base + 0.1 * (100 queued + 200 own) = 31 ms
    assert d.predicted_ttft_ms == pytest.approx(31.0)


def test_prefill_scheduler_load_beats_lagging_heartbeat() -> None:
    """The scheduler's own in-flight tokens count even when the heartbeat has not seen them."""
    s = snap(prefill("p0"), prefill("p1"), decode("d0"), loads={"p0": Load(2, 400, 0)})
    assert decide(s, request(50), CFG).prefill.worker_id == "p1"  # type: ignore[union-attr]


def test_prefill_per_worker_cost_model() -> None:
    """A worker twice as fast wins despite a longer queue, while its finish is earlier."""
    fast = CostModel(1.0, 0.1, scale=0.5)
    s = snap(prefill("p0", queued=300), prefill("p1", queued=0), decode("d0"), costs={"p0": fast})
    # p0: (1 + 0.1*(300+200))*0.5 = 25.5; p1: 1 + 0.1*200 = 21 -> p1
    assert decide(s, request(200), CFG).prefill.worker_id == "p1"  # type: ignore[union-attr]
    s = snap(prefill("p0", queued=100), prefill("p1", queued=0), decode("d0"), costs={"p0": fast})
    # p0: (1 + 30)*0.5 = 15.5 < 21 -> p0
    assert decide(s, request(200), CFG).prefill.worker_id == "p0"  # type: ignore[union-attr]


def test_prefill_tie_goes_to_lowest_id() -> None:
    s = snap(prefill("p2"), prefill("p1"), prefill("p3"), decode("d0"))
    assert decide(s, request(64), CFG).prefill.worker_id == "p1"  # type: ignore[union-attr]


def test_prefix_hit_preferred_when_load_is_equal() -> None:
    s = snap(prefill("p0"), prefill("p1"), decode("d0"))
    d = decide(s, request(512, prefix_hits={"p1": 480}), CFG)
    assert d.prefill is not None and d.prefill.worker_id == "p1"
    assert d.reason == "prefix hit" and d.uncached_tokens == 32


def test_prefix_hit_weighed_against_load() -> None:
    """The holder of the prefix loses when its queue costs more than the hit saves."""
    hits = {"p1": 256}  # saves 25.6 ms
    busy = snap(prefill("p0"), prefill("p1", queued=300), decode("d0"))  # costs 30 ms
    assert decide(busy, request(512, prefix_hits=hits), CFG).prefill.worker_id == "p0"  # type: ignore[union-attr]
    light = snap(prefill("p0"), prefill("p1", queued=200), decode("d0"))  # costs 20 ms
    assert decide(light, request(512, prefix_hits=hits), CFG).prefill.worker_id == "p1"  # type: ignore[union-attr]


def test_short_prompt_prefilled_on_decode_at_threshold() -> None:
    cfg = PolicyConfig(prefill_prior=PRIOR, local_prefill_tokens=64)
    s = snap(prefill("p0"), decode("d0"))
    below = decide(s, request(63), cfg)
    assert below.prefill is None and below.reason == "short prompt: prefill on decode"
    at = decide(s, request(64), cfg)
    assert at.prefill is not None  # "under the threshold" is strict


def test_short_means_uncached_on_the_decode_worker() -> None:
    cfg = PolicyConfig(prefill_prior=PRIOR, local_prefill_tokens=64)
    s = snap(prefill("p0"), decode("d0"))
    d = decide(s, request(400, prefix_hits={"d0": 352}), cfg)
    assert d.prefill is None and d.uncached_tokens == 48


def test_threshold_zero_keeps_every_prompt_remote() -> None:
    s = snap(prefill("p0"), decode("d0"))
    assert decide(s, request(1), CFG).prefill is not None


def test_long_prefill_queue_goes_local_when_decode_has_headroom() -> None:
    cfg = PolicyConfig(prefill_prior=PRIOR, local_prefill_queue_ms=100.0, decode_headroom_seqs=8)
    s = snap(prefill("p0", queued=2000), decode("d0", running=2))  # wait 201 ms
    d = decide(s, request(300), cfg)
    assert d.prefill is None and d.reason == "prefill queues long: prefill on decode"
    full = snap(prefill("p0", queued=2000), decode("d0", running=8))  # no headroom
    assert decide(full, request(300), cfg).prefill is not None
    short_queue = snap(prefill("p0", queued=500), decode("d0", running=2))  # wait 51 ms
    assert decide(short_queue, request(300), cfg).prefill is not None


def test_no_prefill_worker_prefills_on_decode() -> None:
    d = decide(snap(decode("d0")), request(100), CFG)
    assert d.prefill is None and "no prefill worker" in d.reason


def test_decode_needs_free_blocks_for_prompt_and_max_tokens() -> None:
    # need ceil((100 + 60) / 16) = 10 blocks
    s = snap(prefill("p0"), decode("d0", free=9, running=0), decode("d1", free=10, running=5))
    assert decide(s, request(100, 60), CFG).decode.worker_id == "d1"
    s = snap(prefill("p0"), decode("d0", free=10, running=0), decode("d1", free=500, running=5))
    assert decide(s, request(100, 60), CFG).decode.worker_id == "d0"  # fits: batch first


def test_decode_counts_blocks_already_sent_there() -> None:
    s = snap(prefill("p0"), decode("d0"), decode("d1"), loads={"d0": Load(1, 0, 995)})
    assert decide(s, request(100, 60), CFG).decode.worker_id == "d1"


def test_decode_batch_then_free_blocks_then_id() -> None:
    s = snap(prefill("p0"), decode("d1", free=500), decode("d0", free=500), decode("d2", free=900))
    assert decide(s, request(10), CFG).decode.worker_id == "d2"
    s = snap(prefill("p0"), decode("d1", free=500), decode("d0", free=500))
    assert decide(s, request(10), CFG).decode.worker_id == "d0"


def test_decode_none_fits_takes_the_roomiest() -> None:
    s = snap(prefill("p0"), decode("d0", free=2), decode("d1", free=5))
    assert decide(s, request(200, 100), CFG).decode.worker_id == "d1"


def test_admission_at_the_boundary() -> None:
    s = snap(prefill("p0", queued=190), decode("d0"))  # 1 + 0.1 * (190 + 100) = 30 ms
    ok = decide(s, request(100, ttft_slo_ms=30.0), CFG)
    assert not ok.rejected and ok.predicted_ttft_ms == pytest.approx(30.0)
    no = decide(s, request(100, ttft_slo_ms=29.9), CFG)
    assert no.rejected.startswith("predicted TTFT 30 ms exceeds") and no.retry_after_s >= 0.1
    assert decide(s, request(100), CFG).rejected == ""  # no SLO, no admission


def test_admission_retry_hint_grows_with_the_overshoot() -> None:
    s = snap(prefill("p0", queued=50_000), decode("d0", running=32))  # ~5 s; decode full
    d = decide(s, request(100, ttft_slo_ms=1000.0), CFG)
    assert d.rejected and 3.5 <= d.retry_after_s <= 4.5


def test_itl_admission() -> None:
    cfg = PolicyConfig(prefill_prior=PRIOR, decode_cost=DecodeCost(5.0, 1.0))
    s = snap(prefill("p0"), decode("d0", running=9))  # itl(10) = 15 ms
    assert not decide(s, request(10, itl_slo_ms=15.0), cfg).rejected
    assert "ITL" in decide(s, request(10, itl_slo_ms=14.0), cfg).rejected


def test_pins() -> None:
    s = snap(prefill("p0"), prefill("p1", queued=9999), decode("d0"), decode("d1"))
    d = decide(s, request(10, prefill_pin="addr-p1", decode_pin="d1"), CFG)
    assert (d.prefill.worker_id, d.decode.worker_id, d.reason) == ("p1", "d1", "pinned")  # type: ignore[union-attr]
    with pytest.raises(NoWorker) as e:
        decide(s, request(10, prefill_pin="nope"), CFG)
    assert e.value.field == "prefill_worker"


def test_no_decode_worker() -> None:
    with pytest.raises(NoWorker):
        decide(snap(prefill("p0")), request(10), CFG)


def test_round_robin_and_least_loaded_baselines() -> None:
    s = snap(prefill("p1"), prefill("p0"), decode("d0"), decode("d1"), decode("d2"))
    rr = PolicyConfig(policy="round_robin", local_prefill_tokens=1000)
    picks = [decide(s, request(10, seq=i), rr) for i in range(4)]
    assert [d.prefill.worker_id for d in picks] == ["p0", "p1", "p0", "p1"]  # type: ignore[union-attr]
    assert [d.decode.worker_id for d in picks] == ["d0", "d1", "d2", "d0"]
    ll = PolicyConfig(policy="least_loaded")
    s = snap(prefill("p0"), prefill("p1"), decode("d0"), loads={"p0": Load(1, 10, 0)})
    assert decide(s, request(10, ttft_slo_ms=0.001), ll).prefill.worker_id == "p1"  # type: ignore[union-attr]
    assert not decide(s, request(10, ttft_slo_ms=0.001), ll).rejected  # baselines never refuse


def test_unknown_policy_is_rejected() -> None:
    with pytest.raises(ValueError):
        PolicyConfig(policy="random")
