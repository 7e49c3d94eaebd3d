"""The prefill side's handoff never waits on Redis, and Redis catches up after an outage.

A real Valkey behind a proxy the test turns into a black hole: the sender holds,
serves and releases at once while Redis swallows every write; once the proxy
forwards again, the records of handoffs that ended meanwhile are deleted by the
mirror's retries (none is left to expire by TTL), and one request's writes
land in the order issued.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from disagg.metastore.embedded import EmbeddedValkey
from disagg.metastore.store import MetaStore
from disagg.transfer import mirror
from disagg.transfer.state import HandoffState, state_from_pb
from tests.security.redis_proxy import RedisProxy
from tests.transfer.support import assert_empty, mock_engine, prefill, sender_for

S = HandoffState
NS = "mirror-test"  # this test's keys only, whatever else the shared Valkey holds
# Socket timeouts far above anything awaited here: a call that waited on Redis would show.
SLOW = "socket_timeout=30&socket_connect_timeout=30"


@pytest.fixture(autouse=True)
def _empty_namespace(valkey: EmbeddedValkey) -> None:
    with redis.Redis.from_url(valkey.url) as r:
        for key in r.scan_iter(f"{NS}:*"):
            r.delete(key)


def test_hold_serve_release_do_not_wait_on_a_black_holed_redis(valkey: EmbeddedValkey) -> None:
    engine = mock_engine()
    try:
        before = prefill(engine, "bh-before", list(range(3, 40)))
        during = prefill(engine, "bh-during", list(range(3, 50)))

        async def scenario(proxy: RedisProxy) -> None:
            store = MetaStore(proxy.url(query=SLOW), namespace=NS, timeout_s=30.0)
            direct = MetaStore(valkey.url, namespace=NS)
            try:
                sender = sender_for(engine, store=store)
                await sender.hold("bh-before", before)  # published while Redis answers
                await sender.settle()
                assert await direct.get_kv_handle("bh-before") is not None

                proxy.blackhole()
                start = time.monotonic()
                await asyncio.wait_for(sender.hold("bh-during", during), 0.5)
                for rid in ("bh-before", "bh-during"):
                    assert len([c async for c in sender.serve(rid)]) == 2  # one per layer
                    assert sender.release(rid, consumed=True)
                assert time.monotonic() - start < 0.5  # nothing above waited on Redis
                await asyncio.sleep(mirror.MIRROR_TIMEOUT_S * 1.5)  # the writes time out
                assert proxy.swallowed > 0
                assert await direct.get_kv_handle("bh-before") is not None  # drop failed

                proxy.forward()
                deadline = time.monotonic() + mirror.SWEEP_S * 4 + 2 * mirror.MIRROR_TIMEOUT_S
                while await direct.count_kv_keys() or sender._mirror.pending_deletes:
                    assert time.monotonic() < deadline, "a record outlived the outage"
                    await asyncio.sleep(0.1)
                await sender.settle()
                assert await direct.count_kv_keys() == 0
                assert sender.freed[S.CONSUMED] == 2
                sender.close()
            finally:
                await store.close()
                await direct.close()

        with RedisProxy(valkey.port) as proxy:
            asyncio.run(scenario(proxy))
        assert_empty(engine)
    finally:
        engine.stop()


def test_one_requests_writes_land_in_order(valkey: EmbeddedValkey) -> None:
    """put, set_state, drop issued back to back: the record ends deleted, never resurrected
    by a put that was slower than the delete."""
    engine = mock_engine()
    try:
        firsts = {f"ord-{i}": prefill(engine, f"ord-{i}", list(range(3, 20 + i))) for i in range(8)}

        async def scenario() -> None:
            store = MetaStore(valkey.url, namespace=NS)
            try:
                sender = sender_for(engine, store=store)
                for rid, first in firsts.items():
                    await sender.hold(rid, first)
                    sender.begin(rid)
                    if rid != "ord-7":
                        sender.release(rid, consumed=True)
                await sender.settle()
                left = await store.list_kv_handles()
                assert [(h.request_id, state_from_pb(h.state)) for h in left] == [
                    ("ord-7", S.TRANSFERRING)
                ]
                sender.release("ord-7", consumed=False)
                await sender.settle()
                assert await store.count_kv_keys() == 0
            finally:
                await store.close()

        asyncio.run(scenario())
        assert_empty(engine)
    finally:
        engine.stop()
