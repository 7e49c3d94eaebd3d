"""The channel cache is bounded: least recently used out, and an evicted channel is closed.

Real grpc.aio servers on 127.0.0.1 (health only) and real channels to them:
1. ``max_channels=2``: a, b, a, c -> b (least recently used) is evicted and
   closed (a call on it fails), a and c stay open and serve; asking for b again
   opens a new channel.
2. An evicted channel's RPCs in flight get the grace period, then are
   cancelled: a health Watch stream on an evicted channel keeps going after the
   eviction, and ends cancelled once the grace is over; ``close_all`` waits for
   that.
3. The default bound is what the module says (256), so a decode worker or a
   scheduler fed ever new addresses holds at most that many channels.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from disagg.runtime.channels import MAX_CHANNELS, ChannelCache
from disagg.runtime.grpc_server import GrpcServer, create_grpc_server


async def _servers(n: int) -> list[GrpcServer]:
    servers = []
    for _ in range(n):
        server = await create_grpc_server("127.0.0.1", 0, [])
        await server.start()
        await server.set_serving(True)
        servers.append(server)
    return servers


async def _check(channel: grpc.aio.Channel) -> int:
    resp = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5
    )
    return int(resp.status)


async def _lru_scenario() -> None:
    servers = await _servers(3)
    a, b, c = (f"127.0.0.1:{s.port}" for s in servers)
    cache = ChannelCache(max_channels=2, evict_grace_s=0.0)
    try:
        ch_a, ch_b = cache.get_channel(a), cache.get_channel(b)
        assert await _check(ch_a) == await _check(ch_b) == health_pb2.HealthCheckResponse.SERVING
        assert cache.get_channel(a) is ch_a  # reused, and now the most recently used
        ch_c = cache.get_channel(c)
        assert len(cache) == 2 and a in cache and c in cache and b not in cache
        assert cache.evicted == 1
        for _ in range(100):  # the close runs as a task on the loop
            if ch_b.get_state() == grpc.ChannelConnectivity.SHUTDOWN:
                break
            await asyncio.sleep(0.01)
        assert ch_b.get_state() == grpc.ChannelConnectivity.SHUTDOWN
        with pytest.raises(grpc.aio.UsageError):
            await _check(ch_b)  # closed: no call leaves it
        assert await _check(ch_a) == await _check(ch_c) == health_pb2.HealthCheckResponse.SERVING
        again = cache.get_channel(b)  # evicts a (c was used after it)
        assert again is not ch_b and await _check(again) == health_pb2.HealthCheckResponse.SERVING
        assert a not in cache and cache.evicted == 2
    finally:
        await cache.close_all()
        for s in servers:
            await s.stop(0)


def test_lru_bound_and_evicted_channels_are_closed() -> None:
    asyncio.run(_lru_scenario())


async def _grace_scenario() -> None:
    servers = await _servers(2)
    a, b = (f"127.0.0.1:{s.port}" for s in servers)
    cache = ChannelCache(max_channels=1, evict_grace_s=1.0)
    try:
        watch = health_pb2_grpc.HealthStub(cache.get_channel(a)).Watch(
            health_pb2.HealthCheckRequest()
        )
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        start = time.monotonic()
        cache.get_channel(b)  # evicts a, whose Watch is in flight
        await asyncio.sleep(0.3)
        assert not watch.done()  # within its grace
        await cache.close_all()  # waits for the evicted channel's close
        assert 0.9 <= time.monotonic() - start < 10.0
        assert watch.done() and watch.cancelled()
        assert len(cache) == 0
    finally:
        await cache.close_all()
        for s in servers:
            await s.stop(0)


def test_evicted_channels_rpcs_get_a_grace_period() -> None:
    asyncio.run(_grace_scenario())


def test_default_bound() -> None:
    assert MAX_CHANNELS == 256
    with pytest.raises(ValueError):
        ChannelCache(max_channels=0)
