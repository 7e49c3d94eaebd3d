"""Every gRPC server caps the RPCs it runs at once (``maximum_concurrent_rpcs``).

A real server from ``create_grpc_server(max_concurrent_rpcs=1)`` with a
PrefillWorker servicer whose PullKv stream waits until released: while one
PullKv is in flight, a second call (another method) is answered
RESOURCE_EXHAUSTED by gRPC, before any handler runs; once the first ends, the
server serves again. The default and the configured values are checked too
(the configured value reaching real worker and scheduler servers is in
tests/security/test_worker_trust.py).
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from disagg.runtime.config import SchedulerConfig, WorkerConfig
from disagg.runtime.grpc_server import MAX_CONCURRENT_RPCS, create_grpc_server
from disagg.v1 import worker_pb2, worker_pb2_grpc

SERVICE = "disagg.v1.PrefillWorker"


class Blocking(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.calls = 0

    async def PullKv(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        self.entered.set()
        await self.release.wait()
        yield worker_pb2.KvChunk(layer=0)

    async def ReleaseKv(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        return worker_pb2.ReleaseKvResponse(released=True)


async def _scenario() -> None:
    server = await create_grpc_server("127.0.0.1", 0, [SERVICE], max_concurrent_rpcs=1)
    servicer = Blocking()
    worker_pb2_grpc.add_PrefillWorkerServicer_to_server(servicer, server.server)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = worker_pb2_grpc.PrefillWorkerStub(ch)
            pull = stub.PullKv(worker_pb2.PullKvRequest(request_id="a"), timeout=10)
            await asyncio.wait_for(servicer.entered.wait(), 5)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ReleaseKv(worker_pb2.ReleaseKvRequest(request_id="b"), timeout=5)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert servicer.calls == 1  # the refused call never reached its handler
            servicer.release.set()
            assert len([c async for c in pull]) == 1
            resp = await stub.ReleaseKv(worker_pb2.ReleaseKvRequest(request_id="b"), timeout=5)
            assert resp.released and servicer.calls == 2
    finally:
        await server.stop(0)


def test_a_server_with_a_limit_of_one_refuses_a_second_concurrent_call() -> None:
    asyncio.run(_scenario())


def test_limits_default_and_validated() -> None:
    assert WorkerConfig().max_concurrent_rpcs == MAX_CONCURRENT_RPCS == 1024
    assert (
        SchedulerConfig().rpc_limit == 1024 and SchedulerConfig(max_inflight=4096).rpc_limit == 8192
    )
    with pytest.raises(ValueError):
        WorkerConfig(max_concurrent_rpcs=0)
    with pytest.raises(ValueError, match="max_inflight"):
        SchedulerConfig(max_inflight=64, max_concurrent_rpcs=64)

    async def bad() -> None:
        await create_grpc_server("127.0.0.1", 0, [], max_concurrent_rpcs=0)

    with pytest.raises(ValueError):
        asyncio.run(bad())
