"""The scheduler's registry against a real Valkey: who it routes to, what it forgets.

- ``routable``: another model, or a KV layout other than the deployment's
  (given, or the one most workers share; a tie goes to the longest-running
  worker), is skipped with a reason.
- Cost models of workers that left are pruned.
- Shortly after Redis was unreachable, workers whose records expired meanwhile
  stay in the view (their heartbeats could not land either); after the grace
  period they go.
"""

from __future__ import annotations

import asyncio
import time

from disagg.metastore.embedded import EmbeddedValkey
from disagg.metastore.store import MetaStore
from disagg.v1 import common_pb2
from services.scheduler.registry import Reservation, WorkerRegistry, common_layout, routable

from .helpers import run_async
from .test_metastore_workers import DECODE, PREFILL, make_worker


def _with(info: common_pb2.WorkerInfo, **changes: object) -> common_pb2.WorkerInfo:
    out = common_pb2.WorkerInfo()
    out.CopyFrom(info)
    for name, value in changes.items():
        if name == "block_size":
            out.layout.block_size = value  # type: ignore[assignment]
        else:
            setattr(out, name, value)
    return out


def test_routable_keeps_one_model_and_one_layout() -> None:
    p0, d0 = make_worker("p0", PREFILL), make_worker("d0", DECODE)
    other_model = _with(make_worker("p1"), model="other")
    other_layout = _with(make_worker("d1", DECODE), block_size=32)
    infos = [p0, d0, other_model, other_layout]

    ok, skipped = routable(infos, "tiny", None)
    assert [i.worker_id for i in ok] == ["p0", "d0"]
    assert skipped["p1"] == "model 'other', this scheduler serves 'tiny'"
    assert skipped["d1"].startswith("KV layout 2x2x8 float32 block_size=32, the deployment's")

    ok, skipped = routable(infos, "", other_layout.layout)  # any model, this layout
    assert [i.worker_id for i in ok] == ["d1"] and set(skipped) == {"p0", "d0", "p1"}


def test_common_layout_majority_then_oldest() -> None:
    a = _with(make_worker("a"), started_unix_ms=200)
    b = _with(make_worker("b"), started_unix_ms=100, block_size=32)
    assert common_layout([]) is None
    assert common_layout([a, b]) == b.layout  # a tie: the longest-running worker's
    c = _with(make_worker("c"), started_unix_ms=300)
    assert common_layout([a, b, c]) == a.layout  # most workers share it


def test_costs_of_workers_that_left_are_pruned(valkey_url: str) -> None:
    async def scenario() -> None:
        store = MetaStore(valkey_url)
        registry = WorkerRegistry(store, refresh_s=0.1, model="tiny")
        try:
            for w in (make_worker("p0"), make_worker("p1"), make_worker("d0", DECODE)):
                await store.register_worker(w, ttl_s=10)
            await registry.refresh()
            registry.observe_prefill("p0", 100, 5.0)
            registry.observe_prefill("p1", 100, 7.0)
            registry.observe_prefill("gone-already", 100, 9.0)  # finished after it left
            await registry.refresh()
            assert set(registry.costs) == {"p0", "p1"}
            await store.remove_worker("p1")
            await registry.refresh()
            assert set(registry.costs) == {"p0"}
            assert [v.worker_id for v in registry.snapshot()] == ["d0", "p0"]
        finally:
            await store.close()

    run_async(scenario())


def test_workers_survive_a_redis_outage_for_the_grace_period(own_valkey: EmbeddedValkey) -> None:
    async def scenario() -> None:
        store = MetaStore(own_valkey.url, timeout_s=0.5, retries=0)
        registry = WorkerRegistry(store, refresh_s=0.1, outage_grace_s=1.0)
        try:
            for w in (make_worker("p0"), make_worker("d0", DECODE)):
                await store.register_worker(w, ttl_s=10)
            await registry.refresh()
            assert len(registry.snapshot()) == 2
            own_valkey.stop()
            await registry.refresh()  # fails: the last view stays
            assert len(registry.snapshot()) == 2
            own_valkey.start()  # back, empty: the records were lost with it
            await store.register_worker(make_worker("p9"), ttl_s=10)
            await registry.refresh()
            assert [v.worker_id for v in registry.snapshot()] == ["d0", "p0", "p9"]
            await asyncio.sleep(1.1)
            await registry.refresh()  # the grace is over: only registered workers
            assert [v.worker_id for v in registry.snapshot()] == ["p9"]
        finally:
            await store.close()

    run_async(scenario())


def test_a_heartbeat_older_than_our_finished_prefill_does_not_price_the_worker_out() -> None:
    """p0 reported 500 queued tokens in a heartbeat sent before a prefill this scheduler
    saw finish there: that queue is not a floor any more (it priced prefix holders out
    right after they served). A newer heartbeat counts again."""
    registry = WorkerRegistry(MetaStore("redis://127.0.0.1:1/0"), refresh_s=0.1, model="tiny")
    now_ms = int(time.time() * 1000)
    busy = _with(make_worker("p0"), queued_prefill_tokens=500, heartbeat_unix_ms=now_ms - 1000)
    registry.set_infos([busy, make_worker("d0", DECODE)])

    def queued() -> int:
        (p0,) = (v for v in registry.policy_snapshot().workers if v.worker_id == "p0")
        return p0.queued_prefill_tokens

    assert queued() == 500
    registry.prefill_done(Reservation("p0", 500, "d0", 4))
    assert queued() == 0
    newer = _with(busy, heartbeat_unix_ms=now_ms + 1000)  # sent after it: its queue is news
    registry.set_infos([newer, make_worker("d0", DECODE)])
    assert queued() == 500
