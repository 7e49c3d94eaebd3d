"""The worker's prefix publisher on a real Valkey: it publishes, and its stop ends.

A cancel that redis-py turns into a ConnectionError in the middle of a command
(it can) was taken for an outage: the loop went on and the worker's stop waited
for it for good (a test cluster's stop hung 30 s in CI, the stacks in the
publisher's loop).
"""

from __future__ import annotations

import asyncio
import time

from disagg.metastore.store import MetaStore
from disagg.mock.engine import MockEngine
from disagg.worker.prefix import PrefixPublisher
from tests.control.helpers import run_in_thread


def test_a_cancel_lost_in_a_redis_call_does_not_hang_the_stop(valkey_url: str) -> None:
    async def body() -> None:
        store = MetaStore(valkey_url)
        publisher = PrefixPublisher(store, MockEngine(), "prefill-x", period_s=0.05, ttl_s=1.0)
        publisher.start()
        deadline = time.monotonic() + 5
        while await store.get_prefix_set("prefill-x") is None:  # published for real first
            assert time.monotonic() < deadline, "nothing published"
            await asyncio.sleep(0.02)
        in_call = asyncio.Event()

        async def lossy_touch(worker_id: str, ttl_s: float) -> bool:
            in_call.set()
            try:
                await asyncio.sleep(30)  # a command in flight
            except asyncio.CancelledError:
                raise ConnectionError("Connection closed by server.") from None
            return True

        store.touch_prefix_set = lossy_touch  # type: ignore[method-assign]
        await asyncio.wait_for(in_call.wait(), 5)  # the loop is in the call
        started = time.monotonic()
        await asyncio.wait_for(publisher.stop(), 5)
        assert time.monotonic() - started < 5
        await store.close()

    run_in_thread(body, "the prefix publisher's stop")
