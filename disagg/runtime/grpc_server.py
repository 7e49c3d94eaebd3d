"""A grpc.aio server with health, reflection and the project's message limits.

Lifecycle:
1. ``server = await create_grpc_server(host, port, service_names)`` binds
   host:port (port 0 = a free port; ``server.port`` is the bound one). Health
   reports NOT_SERVING for "" and every service name.
2. The caller adds its servicers to ``server.server`` (the generated
   ``add_XServicer_to_server`` functions), then ``await server.start()``.
3. ``await server.set_serving(True)`` once the service can answer (model
   loaded, registered); ``set_serving(False)`` while it cannot.
4. ``await server.stop(grace_s)``: health turns NOT_SERVING for good (so load
   balancers and the scheduler stop sending), then in-flight RPCs get grace_s
   to finish before they are cancelled.

Reflection lists the given services plus grpc.health.v1.Health and the
reflection service itself, so ``grpcurl`` works against every process.
Every server caps the RPCs it runs at once (``max_concurrent_rpcs``, health
checks and streams included): one more is answered RESOURCE_EXHAUSTED at once
by gRPC itself, before any handler runs, so a flood of calls cannot pile up
unbounded work. The scheduler's own admission cap (``max_inflight``) sits below
it and answers first, with a retry hint.
Must be called with an event loop running (grpc.aio binds to it).
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

MAX_MESSAGE_BYTES = 16 << 20  # KV transfer chunks stay well under this
MAX_CONCURRENT_RPCS = 1024  # RPCs one server runs at once; more get RESOURCE_EXHAUSTED


def message_size_options(max_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """gRPC channel/server options raising the send and receive limits to max_bytes."""
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
    ]


HEALTH_SERVICE_NAME: str = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION_SERVICE_NAME: str = reflection.SERVICE_NAME


class GrpcServer:
    """A bound (not yet started) grpc.aio server with its health servicer."""

    def __init__(
        self,
        server: grpc.aio.Server,
        port: int,
        health: health_aio.HealthServicer,
        service_names: Sequence[str],
    ) -> None:
        self.server = server
        self.port = port
        self.health = health
        self.service_names = tuple(service_names)

    async def start(self) -> None:
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        """Sets the health of "" and every service name. Ignored once stopping."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace_s: float | None = 5.0) -> None:
        """NOT_SERVING for good, then stop; RPCs still running after grace_s are cancelled."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def create_grpc_server(
    host: str,
    port: int,
    service_names: Sequence[str],
    *,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    credentials: grpc.ServerCredentials | None = None,
    reuse_port: bool = False,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    max_concurrent_rpcs: int = MAX_CONCURRENT_RPCS,
) -> GrpcServer:
    """Binds a server on host:port with health (NOT_SERVING) and reflection added;
    TLS when credentials are given (see disagg.runtime.tls); at most
    max_concurrent_rpcs RPCs at once (>= 1).

    SO_REUSEPORT only when reuse_port: by default a second server on a taken port
    must fail, not silently split its traffic. Scheduler replicas opt in (`disagg up
    --schedulers N`): they are interchangeable, the kernel spreads new connections
    over them, and Linux admits to the port group only sockets of the same user.

    Raises OSError if the address cannot be bound.
    """
    if max_concurrent_rpcs < 1:
        raise ValueError(f"max_concurrent_rpcs must be >= 1, got {max_concurrent_rpcs}")
    options = [*message_size_options(max_message_bytes), ("grpc.so_reuseport", int(reuse_port))]
    server = grpc.aio.server(
        options=options,
        interceptors=list(interceptors) or None,
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (*service_names, HEALTH_SERVICE_NAME, REFLECTION_SERVICE_NAME), server
    )
    bound = _bind(server, host, port, credentials)
    result = GrpcServer(server, bound, health, service_names)
    await result.set_serving(False)
    return result


def _bind(
    server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None
) -> int:
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as e:  # grpc raises this when the bind fails
        raise OSError(f"cannot bind gRPC server to {address}: {e}") from e
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    return int(bound)
