"""gRPC server helper: health NOT_SERVING -> SERVING, reflection, graceful stop; channel cache."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from disagg.runtime import channels
from disagg.runtime.grpc_server import (
    HEALTH_SERVICE_NAME,
    REFLECTION_SERVICE_NAME,
    GrpcServer,
    create_grpc_server,
)
from disagg.v1 import worker_pb2  # registers disagg.v1.PrefillWorker's descriptors

from .helpers import run_async

PREFILL_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["PrefillWorker"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SLOW_METHOD = "/test.Slow/Sleep"


def _slow_handler() -> grpc.GenericRpcHandler:
    async def sleep(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await asyncio.sleep(0.3)
        return b"done:" + request

    return grpc.method_handlers_generic_handler(
        "test.Slow", {"Sleep": grpc.unary_unary_rpc_method_handler(sleep)}
    )


async def _status(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


def _reflected_services(address: str) -> tuple[list[str], str]:
    with grpc.insecure_channel(address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        names = sorted(db.get_services())
        file = db.FindFileContainingSymbol(PREFILL_SERVICE)
        return names, file.name


async def _started() -> GrpcServer:
    server = await create_grpc_server("127.0.0.1", 0, [PREFILL_SERVICE])
    server.server.add_generic_rpc_handlers((_slow_handler(),))
    await server.start()
    return server


def test_health_and_reflection() -> None:
    async def scenario() -> None:
        server = await _started()
        address = f"127.0.0.1:{server.port}"
        assert server.port > 0
        try:
            channel = channels.get_channel(address)
            assert channels.get_channel(address) is channel  # cached
            assert await _status(channel, "") == NOT_SERVING
            assert await _status(channel, PREFILL_SERVICE) == NOT_SERVING

            await server.set_serving(True)
            assert await _status(channel, "") == SERVING
            assert await _status(channel, PREFILL_SERVICE) == SERVING

            names, file = await asyncio.to_thread(_reflected_services, address)
            assert names == sorted([PREFILL_SERVICE, HEALTH_SERVICE_NAME, REFLECTION_SERVICE_NAME])
            assert file == "disagg/v1/worker.proto"
        finally:
            await channels.close_all()
            await server.stop(0)

    run_async(scenario())


def test_graceful_stop_finishes_inflight_and_reports_not_serving() -> None:
    async def scenario() -> None:
        server = await _started()
        await server.set_serving(True)
        cache = channels.ChannelCache()
        channel = cache.get_channel(f"127.0.0.1:{server.port}")
        try:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == SERVING
            slow = asyncio.ensure_future(channel.unary_unary(SLOW_METHOD)(b"x", timeout=5))
            await asyncio.sleep(0.1)  # the call is in flight

            stopping = asyncio.ensure_future(server.stop(grace_s=3))
            assert (await watch.read()).status == NOT_SERVING
            watch.cancel()
            assert await slow == b"done:x"  # in-flight call completed within the grace
            await stopping

            await server.set_serving(True)  # ignored once stopping
            try:
                await channel.unary_unary(SLOW_METHOD)(b"y", timeout=2)
                raise AssertionError("server still answering after stop")
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await cache.close_all()

    run_async(scenario())
