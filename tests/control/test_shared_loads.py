"""Scheduler replicas share their in-flight loads through a real Valkey.

Two registries (two replicas) on one server: what replica A books on a worker
reaches replica B's routing snapshot after one refresh of each -- or, pushed,
within milliseconds and no refresh at all -- and leaves it when A finishes the
request, leaves, or dies (its record's TTL).
"""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from disagg.metastore.keys import DEFAULT
from disagg.metastore.store import MetaStore
from disagg.policy.routing import Decision, Load, RouteRequest, decide
from disagg.v1 import common_pb2
from services.scheduler.registry import WorkerRegistry
from tests.control.helpers import run_in_thread

LAYOUT = common_pb2.KvLayout(
    num_layers=2, num_kv_heads=1, head_dim=8, dtype="float32", block_size=16
)


def _info(worker_id: str, role: int) -> common_pb2.WorkerInfo:
    return common_pb2.WorkerInfo(
        worker_id=worker_id,
        role=role,
        address=f"127.0.0.1:{1000 + len(worker_id)}",
        layout=LAYOUT,
        free_blocks=100,
        total_blocks=100,
    )


async def _cluster(url: str) -> tuple[MetaStore, WorkerRegistry, WorkerRegistry]:
    store = MetaStore(url)
    for worker_id, role in (
        ("prefill-a", common_pb2.WORKER_ROLE_PREFILL),
        ("prefill-b", common_pb2.WORKER_ROLE_PREFILL),
        ("decode-a", common_pb2.WORKER_ROLE_DECODE),
    ):
        await store.register_worker(_info(worker_id, role), ttl_s=30)
    a = WorkerRegistry(MetaStore(url), refresh_s=0.25, replica_id="replica-a")
    b = WorkerRegistry(MetaStore(url), refresh_s=0.25, replica_id="replica-b")
    await a.refresh()
    await b.refresh()
    return store, a, b


def _book(reg: WorkerRegistry, prefill: str, tokens: int) -> Decision:
    views = {v.worker_id: v for v in reg.snapshot()}
    return Decision(views[prefill], views["decode-a"], "test", uncached_tokens=tokens)


def test_a_replicas_bookings_reach_the_other(valkey_url: str) -> None:
    async def body() -> None:
        store, a, b = await _cluster(valkey_url)
        booking = a.reserve(_book(a, "prefill-a", 4000), prompt_tokens=4000, max_tokens=16)
        assert b.policy_snapshot().loads == {}  # not published yet
        await a.refresh()
        await b.refresh()
        assert b.replicas == 2 and a.replicas == 2
        seen = b.policy_snapshot().loads
        assert seen["prefill-a"] == Load(requests=1, tokens=4000)
        assert seen["decode-a"].requests == 1 and seen["decode-a"].blocks == 251
        assert a.policy_snapshot().loads == a.loads  # a does not count itself twice

        # B routes a new prompt around A's 4,000 queued tokens.
        req = RouteRequest(prompt_tokens=500, max_tokens=16)
        assert decide(b.policy_snapshot(), req).prefill.worker_id == "prefill-b"  # type: ignore[union-attr]

        a.release(booking)
        await a.refresh()
        await b.refresh()
        assert b.policy_snapshot().loads == {}
        for reg in (a, b):
            await reg.leave()
        await store.close()

    asyncio.run(body())


def test_a_dead_replicas_loads_expire(valkey_url: str) -> None:
    async def body() -> None:
        store, a, b = await _cluster(valkey_url)
        a.reserve(_book(a, "prefill-b", 900), prompt_tokens=900, max_tokens=16)
        await a.refresh()
        await b.refresh()
        assert b.policy_snapshot().loads["prefill-b"].tokens == 900
        # a stops refreshing (dies): its record outlives it by loads_ttl_s at most
        died = time.monotonic()
        while b.peers:
            await asyncio.sleep(0.1)
            await b.refresh()
            assert time.monotonic() - died < a.loads_ttl_s + 1.0
        assert b.replicas == 1 and b.policy_snapshot().loads == {}
        await b.leave()
        await store.close()

    asyncio.run(body())


def test_leaving_withdraws_at_once(valkey_url: str) -> None:
    async def body() -> None:
        store, a, b = await _cluster(valkey_url)
        a.reserve(_book(a, "prefill-a", 10), prompt_tokens=10, max_tokens=16)
        await a.refresh()
        await a.leave()
        await b.refresh()
        assert b.peers == {} and b.replicas == 1
        await b.leave()
        assert await store.list_scheduler_loads() == []
        await store.close()

    asyncio.run(body())


def test_pushed_loads_reach_the_peer_without_a_refresh(valkey_url: str) -> None:
    async def body() -> None:
        store, a, b = await _cluster(valkey_url)
        for reg in (a, b):
            reg._refresh_s = 60.0  # no refresh during the test: what arrives is pushed
        await a.refresh()
        await b.start()  # watches the peers' pushes
        raw = aioredis.Redis.from_url(valkey_url)
        channel = DEFAULT.scheduler_loads_channel
        while (await raw.pubsub_numsub(channel))[0][1] < 1:
            await asyncio.sleep(0.01)
        assert a.replicas == b.replicas == 2 and b.peers == {}

        async def seen_by_b(cond) -> float:  # type: ignore[no-untyped-def]
            t0 = time.monotonic()
            while not cond(b.policy_snapshot().loads):
                assert time.monotonic() - t0 < 2.0, b.policy_snapshot().loads
                await asyncio.sleep(0.001)
            return time.monotonic() - t0

        booking = a.reserve(_book(a, "prefill-a", 3000), prompt_tokens=3000, max_tokens=16)
        lag = await seen_by_b(lambda loads: loads.get("prefill-a") == Load(1, 3000))
        assert lag < 0.5  # pushed: milliseconds here, where a refresh would take a minute
        req = RouteRequest(prompt_tokens=500, max_tokens=16)
        assert decide(b.policy_snapshot(), req).prefill.worker_id == "prefill-b"  # type: ignore[union-attr]

        a.prefill_done(booking)
        await seen_by_b(lambda loads: "prefill-a" not in loads)
        a.release(booking)  # a decode worker's load: shared by the refresh, not pushed
        await a.refresh()
        await b.refresh()
        assert b.policy_snapshot().loads == {}
        for reg in (a, b):
            await reg.stop()
            await reg.leave()
        assert await store.list_scheduler_loads() == []  # no push after stop revived a record
        await raw.aclose()
        await store.close()

    asyncio.run(body())


def test_a_peer_unheard_of_through_an_outage_stops_holding_slots(valkey_url: str) -> None:
    async def body() -> None:
        store, a, b = await _cluster(valkey_url)
        slots = {"prefill-a": (1, 0.0)}  # A has a prefill in flight there
        a.dispatch_state = lambda: slots
        await a.refresh()
        await b.refresh()
        assert b.peer_slots("prefill-a").running == 1 and b.replicas == 2
        await b._store.close()  # B loses Redis: its refreshes fail from now on
        b._store = MetaStore("redis://127.0.0.1:1/0", timeout_s=0.2, retries=0)
        await b.refresh()
        assert b.peer_slots("prefill-a").running == 1  # within A's TTL: still counts
        b._peer_seen = {p: t - b.loads_ttl_s - 0.1 for p, t in b._peer_seen.items()}
        await b.refresh()
        assert b.peer_slots("prefill-a").running == 0 and b.replicas == 1
        await b._store.close()
        await a.leave()
        await store.close()

    asyncio.run(body())


def test_a_cancel_lost_in_a_redis_call_does_not_hang_the_stop(valkey_url: str) -> None:
    """redis-py can answer a cancellation in the middle of a command with a
    ConnectionError: the refresh took it for an outage, the loop went on, and the
    registry's stop (so the scheduler's) waited for it for good."""

    async def body() -> None:
        store, a, b = await _cluster(valkey_url)
        for reg in (a, b):
            await reg.start()
        in_call = asyncio.Event()

        async def lossy_list_workers() -> list[common_pb2.WorkerInfo]:
            in_call.set()
            try:
                await asyncio.sleep(30)  # a command in flight
            except asyncio.CancelledError:
                raise ConnectionError("Connection closed by server.") from None
            return []

        a._store.list_workers = lossy_list_workers  # type: ignore[method-assign]
        await asyncio.wait_for(in_call.wait(), 5)  # the refresh loop is in the call
        started = time.monotonic()
        await asyncio.wait_for(a.stop(), 5)
        await asyncio.wait_for(b.stop(), 5)  # its watch of the pushes ends too
        assert time.monotonic() - started < 5
        for reg in (a, b):
            await reg.leave()
        await store.close()

    run_in_thread(body, "the registry's stop")
