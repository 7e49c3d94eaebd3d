"""``AsyncClient``: the asyncio client of the Scheduler service (grpc.aio).

    async with AsyncClient("127.0.0.1:50051") as client:
        async for ev in client.generate("Once upon a time", max_tokens=20, temperature=0):
            print(ev.text, end="")

Same lifecycle, retries and errors as ``Client`` (disagg.client.sync). The
channel is opened on the first call, on the running event loop, and serves
every call after it; use one AsyncClient per event loop. Cancelling the task
that iterates a stream, or ``aclose()`` on it, cancels the RPC.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from disagg.client.config import DEFAULT_ADDRESS, resolve
from disagg.client.errors import from_rpc_error
from disagg.client.request import build_request
from disagg.client.retry import RetryPolicy
from disagg.client.sync import Deadline, OnRetry, retry_wait
from disagg.client.types import (
    Collector,
    Completion,
    GenerateEvent,
    Health,
    WorkerInfo,
    event_from_pb,
    worker_from_pb,
)
from disagg.runtime.tls import TlsFiles
from disagg.v1 import scheduler_pb2, scheduler_pb2_grpc

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from disagg.client.request import GenerateOptions


class AsyncGenerateStream:
    """Async iterator of GenerateEvent; aclose() cancels the RPC (async with closes it)."""

    def __init__(self, events: AsyncIterator[GenerateEvent]):
        self._events = events

    def __aiter__(self) -> AsyncGenerateStream:
        return self

    async def __anext__(self) -> GenerateEvent:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        aclose: Any = getattr(self._events, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> AsyncGenerateStream:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class AsyncClient:
    """asyncio client of disagg.v1.Scheduler; arguments as ``Client``'s."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        api_key: str | None = None,
        tls: TlsFiles | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str = "",
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        on_retry: OnRetry | None = None,
    ):
        self._conn = resolve(address, api_key, tls, credentials, server_name)
        self._timeout = timeout
        self._retry = retry or RetryPolicy()
        self._on_retry = on_retry
        self._channel: grpc.aio.Channel | None = None

    @property
    def address(self) -> str:
        return self._conn.address

    def _open(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = self._conn.aio_channel()
        return self._channel

    def generate(
        self, prompt: str | None = None, **options: Unpack[GenerateOptions]
    ) -> AsyncGenerateStream:
        """Streams one completion; options as disagg.v1.GenerateRequest, plus timeout."""
        timeout = options.pop("timeout", None)
        req = build_request(prompt, options)
        deadline = Deadline(self._timeout if timeout is None else timeout)
        return AsyncGenerateStream(self._events(req, deadline))

    async def complete(
        self, prompt: str | None = None, **options: Unpack[GenerateOptions]
    ) -> Completion:
        collector = Collector()
        async with self.generate(prompt, **options) as stream:
            async for ev in stream:
                collector.add(ev)
        return collector.result()

    async def list_workers(self, *, timeout: float | None = None) -> list[WorkerInfo]:
        stub = scheduler_pb2_grpc.SchedulerStub(self._open())
        resp = await self._unary(
            lambda left: stub.ListWorkers(
                scheduler_pb2.ListWorkersRequest(), timeout=left, metadata=self._conn.metadata
            ),
            timeout,
        )
        return [worker_from_pb(w) for w in resp.workers]

    async def health(self, service: str = "", *, timeout: float | None = None) -> Health:
        stub = health_pb2_grpc.HealthStub(self._open())
        resp = await self._unary(
            lambda left: stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=left),
            timeout,
        )
        return Health(service, health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _events(
        self, req: scheduler_pb2.GenerateRequest, deadline: Deadline
    ) -> AsyncIterator[GenerateEvent]:
        stub = scheduler_pb2_grpc.SchedulerStub(self._open())
        attempt = 0
        while True:
            attempt += 1
            call = stub.Generate(req, timeout=deadline.left(), metadata=self._conn.metadata)
            received = False
            try:
                async for resp in call:
                    received = True
                    yield event_from_pb(resp)
                return
            except grpc.aio.AioRpcError as e:
                error = from_rpc_error(e)
                if received:
                    raise error from None
                wait = retry_wait(self._retry, attempt, error, deadline, self._on_retry)
            finally:
                call.cancel()  # a no-op once the call is done
            await asyncio.sleep(wait)

    async def _unary(
        self, call: Callable[[float | None], Awaitable[Any]], timeout: float | None
    ) -> Any:
        deadline = Deadline(self._timeout if timeout is None else timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call(deadline.left())
            except grpc.aio.AioRpcError as e:
                error = from_rpc_error(e)
                await asyncio.sleep(
                    retry_wait(self._retry, attempt, error, deadline, self._on_retry)
                )
