"""Per-client fairness (issue 14, hole 7) through real clients against a real cluster.

The cluster: mock workers (model-free, 1 ms a token, so a stream can be long or
fast as a scenario needs) behind a scheduler with ``max_inflight_per_client=1``,
``client_timeout_s=1`` and ``http_keepalive_s=1``, HTTP on, no API key: a
client is its address, and the tests speak from several loopback addresses
(127.0.0.1, .2, .3 ...: one client each).
1. A client with a stream in flight gets RESOURCE_EXHAUSTED (gRPC) and 429 (the
   openai client) for one more, while another client is served.
2. A client that stops reading its stream is dropped after the timeout: its
   slot, admission and KV come back, its stream is cut short (no [DONE]).
3. The same over gRPC on a bare server: a stalled reader's method is closed.
4. A body that stops arriving is a 408; an idle keep-alive connection is closed.
Leak check (blocks and Redis keys) after each cluster scenario.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import grpc
import openai
import pytest
import redis

from disagg.metastore.embedded import EmbeddedValkey
from disagg.mock.model import make_mock_model
from disagg.runtime.grpc_server import create_grpc_server
from disagg.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.scheduler.grpc_limits import ClientLimits
from services.scheduler.limits import ClientSlots, bearer_token, client_key, grpc_peer_host
from tests.cluster import Cluster

SERVICE = "disagg.v1.Scheduler"
LONG = {"prompt": "t5 t6", "max_tokens": 16000, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def cluster(valkey: EmbeddedValkey, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with redis.Redis.from_url(valkey.url) as r:
        r.flushall()
    model = make_mock_model(str(tmp_path_factory.mktemp("mock-model")))
    sched = {
        "http_port": 0,
        "max_inflight_per_client": 1,
        "client_timeout_s": 1.0,
        "http_keepalive_s": 1.0,
    }
    with pytest.MonkeyPatch.context() as env:  # the mock engines read it when they start
        env.setenv("DISAGG_MOCK_STEP_BASE_MS", "1")
        c = Cluster(
            model,
            valkey.url,
            engine={"num_blocks": 4096},  # room for a whole LONG stream (mock blocks cost nothing)
            worker={"mock": True},
            scheduler=sched,
        ).start()
    yield c
    c.stop()


def _url(cluster: Cluster, path: str = "/v1/completions") -> str:
    return f"http://127.0.0.1:{cluster.app.http_port}{path}"


def _session(host: str, rcvbuf: int = 0) -> aiohttp.ClientSession:
    """An HTTP client speaking from host (a loopback address); a small receive buffer
    (and read-ahead) when rcvbuf is set, so that one that stops reading backs up soon."""

    def small_buffer(addr: Any) -> socket.socket:
        sock = socket.socket(addr[0], addr[1], addr[2])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        return sock

    connector = aiohttp.TCPConnector(
        local_addr=(host, 0), socket_factory=small_buffer if rcvbuf else None
    )
    return aiohttp.ClientSession(connector=connector, read_bufsize=4096 if rcvbuf else 2**16)


async def _complete(host: str, cluster: Cluster) -> tuple[int, Any]:
    async with (
        _session(host) as s,
        s.post(_url(cluster), json={"prompt": "t5 t6", "max_tokens": 4}) as resp,
    ):
        return resp.status, await resp.json()


async def _wait_for(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"{what} after {timeout_s}s"
        await asyncio.sleep(0.05)


async def _cap_scenario(cluster: Cluster) -> None:
    async with grpc.aio.insecure_channel(cluster.address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        held = stub.Generate(scheduler_pb2.GenerateRequest(**LONG))
        assert (await held.read()).token_ids  # in flight: 127.0.0.1 holds its one slot
        second = stub.Generate(scheduler_pb2.GenerateRequest(prompt="t5", max_tokens=2))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await second.read()
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert ("retry-after", "1") in tuple(err.value.trailing_metadata() or ())
        client = openai.AsyncOpenAI(base_url=_url(cluster, "/v1"), api_key="unused", max_retries=0)
        with pytest.raises(openai.RateLimitError) as http_err:
            await client.completions.create(model="m", prompt="t5", max_tokens=2)
        assert http_err.value.response.headers["Retry-After"] == "1"
        assert http_err.value.response.json()["error"]["code"] == "rate_limit_exceeded"
        await client.close()
        status, body = await _complete("127.0.0.2", cluster)  # another client: served
        assert status == 200 and body["usage"]["completion_tokens"] == 4
        refused = cluster.app.metrics.registry.get_sample_value(
            "disagg:requests_rejected_total", {"reason": "client_limit"}
        )
        assert refused == 2  # both refusals on /metrics
        assert not held.done()  # all the while, the first stream was in flight
        held.cancel()
    await _wait_for(lambda: cluster.app.slots.clients() == 0, 10, "slot still held")
    status, _ = await _complete("127.0.0.1", cluster)  # its slot is back
    assert status == 200


def test_per_client_cap_refuses_one_client_while_another_is_served(cluster: Cluster) -> None:
    asyncio.run(_cap_scenario(cluster))
    cluster.wait_no_leaks()


async def _lines(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    try:
        async for line in resp.content:
            yield line
    except aiohttp.ClientPayloadError:  # the server cut the chunked body short
        return


async def _slow_reader_scenario(cluster: Cluster) -> None:
    orch, slots = cluster.app.orchestrator, cluster.app.slots
    async with _session("127.0.0.3", rcvbuf=4096) as s:
        resp = await s.post(_url(cluster), json={**LONG, "stream": True})
        assert resp.status == 200
        assert (await resp.content.readline()).startswith(b"data: ")
        # ... and nothing more read. Its slot is held meanwhile:
        assert (await _complete("127.0.0.3", cluster))[0] == 429
        await _wait_for(lambda: slots.clients() == 0 and orch.inflight == 0, 30, "not dropped")
        rest = [line async for line in _lines(resp)]
        resp.close()
    data = [line for line in rest if line.startswith(b"data: {")]
    assert b"data: [DONE]\n" not in rest and len(data) < LONG["max_tokens"]  # cut short
    status, body = await _complete("127.0.0.3", cluster)  # the client may come back
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"


def test_a_client_that_stops_reading_loses_its_slot(cluster: Cluster) -> None:
    asyncio.run(_slow_reader_scenario(cluster))
    cluster.wait_no_leaks()


async def _stalled_body(cluster: Cluster) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"prompt": "t5", '
        await asyncio.sleep(30)  # never finishes within the test

    async with (
        _session("127.0.0.4") as s,
        s.post(_url(cluster), data=body(), headers={"Content-Type": "application/json"}) as resp,
    ):
        assert resp.status == 408
        assert (await resp.json())["error"]["code"] == "request_timeout"


async def _idle_keepalive(cluster: Cluster) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", cluster.app.http_port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
    await writer.drain()
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    await reader.readuntil(b"\r\n\r\n")  # headers; the body follows, then idle
    closed = await asyncio.wait_for(reader.read(), 10)  # b"" once the server closes it
    writer.close()
    assert b"HTTP" not in closed


def test_stalled_body_is_408_and_idle_connections_close(cluster: Cluster) -> None:
    asyncio.run(_stalled_body(cluster))
    asyncio.run(_idle_keepalive(cluster))
    assert cluster.app.slots.clients() == 0
    cluster.wait_no_leaks()


# --- gRPC, on a bare server: a method whose stream nobody reads -------------------


class _Endless(scheduler_pb2_grpc.SchedulerServicer):
    """Generate yields 64 KiB responses until closed; records that it was."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def Generate(self, request, context):  # type: ignore[no-untyped-def]
        try:
            while True:
                yield scheduler_pb2.GenerateResponse(text="x" * (64 << 10))
        finally:
            self.closed.set()


async def _grpc_stall_scenario() -> None:
    slots = ClientSlots(1)
    server = await create_grpc_server(
        "127.0.0.1", 0, [SERVICE], interceptors=[ClientLimits(slots, "", 0.5, SERVICE)]
    )
    servicer = _Endless()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server.server)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = scheduler_pb2_grpc.SchedulerStub(channel).Generate(
                scheduler_pb2.GenerateRequest(prompt="x")
            )
            await call.read()  # then nothing: grpc's flow-control windows fill up
            await asyncio.wait_for(servicer.closed.wait(), 30)
            assert slots.clients() == 0
            with pytest.raises(grpc.aio.AioRpcError) as err:
                while await call.read() is not grpc.aio.EOF:
                    pass  # what was buffered before the server gave up, then its status
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        await server.stop(0)


def test_grpc_stream_nobody_reads_is_closed() -> None:
    asyncio.run(_grpc_stall_scenario())


class _Slow(scheduler_pb2_grpc.SchedulerServicer):
    """Generate yields three responses, each after a pause longer than the write timeout."""

    async def Generate(self, request, context):  # type: ignore[no-untyped-def]
        for i in range(3):
            await asyncio.sleep(0.5)
            yield scheduler_pb2.GenerateResponse(token_ids=[i])


async def _slow_producer_scenario() -> None:
    slots = ClientSlots(1)
    server = await create_grpc_server(
        "127.0.0.1", 0, [SERVICE], interceptors=[ClientLimits(slots, "", 0.3, SERVICE)]
    )
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(_Slow(), server.server)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            call = scheduler_pb2_grpc.SchedulerStub(channel).Generate(
                scheduler_pb2.GenerateRequest(prompt="x")
            )
            got = [r.token_ids[0] async for r in call]
            assert got == [0, 1, 2] and await call.code() == grpc.StatusCode.OK
        assert slots.clients() == 0
    finally:
        await server.stop(0)


def test_grpc_slow_producer_is_not_a_stalled_reader() -> None:
    """Only a write the client does not take counts, not time waiting for tokens."""
    asyncio.run(_slow_producer_scenario())


# --- who a client is (pure) ---------------------------------------------------------


def test_client_identity_is_the_key_hash_else_the_host() -> None:
    assert grpc_peer_host("ipv4:127.0.0.2:5050") == "127.0.0.2"
    assert grpc_peer_host("ipv6:[::1]:5050") == "::1"
    assert grpc_peer_host("unix:/tmp/s") == "unix:/tmp/s"
    assert client_key("", None, "10.0.0.1") == "peer:10.0.0.1"
    a, b = client_key("k", "secret-a", "h"), client_key("k", "secret-b", "h")
    assert a != b and "secret" not in a and a == client_key("k", "secret-a", "other-host")
    assert bearer_token("Bearer  tok ") == "tok" and bearer_token("Basic tok") == ""


def test_slots_cap_per_client_and_zero_is_no_cap() -> None:
    slots = ClientSlots(2)
    assert slots.try_acquire("a") and slots.try_acquire("a") and not slots.try_acquire("a")
    assert slots.try_acquire("b") and slots.in_flight("a") == 2
    slots.release("a")
    assert slots.try_acquire("a")
    for client in ("a", "a", "b"):
        slots.release(client)
    assert slots.clients() == 0
    free = ClientSlots(0)
    assert all(free.try_acquire("a") for _ in range(1000))
