"""The scheduler's gRPC methods under the client limits (services.scheduler.limits).

A server interceptor, so the servicer stays protobuf in, protobuf out. For
each method of ``disagg.v1.Scheduler`` it returns the method's handler with:
1. a request that does not parse (a string field with bad UTF-8, which is how
   a lone surrogate arrives) answered INVALID_ARGUMENT, not grpc's UNKNOWN;
2. for streaming methods (Generate): the client's slot taken before the
   method runs (none left: RESOURCE_EXHAUSTED with a ``retry-after`` hint), and
   its responses written under a watch (``_Relay``): a client that reads
   nothing for ``client_timeout_s`` (its flow-control window stays full) has
   the method's stream closed, which cancels the request on the workers and
   frees its KV, its slot given back, and DEADLINE_EXCEEDED after what it had
   not read. The slot is given back when the method ends, however it ends.
The message size limit is the server's own (``max_receive_message_length``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from services.scheduler.limits import (
    RETRY_AFTER_S,
    ClientSlots,
    bearer_token,
    client_key,
    grpc_peer_host,
)

log = logging.getLogger(__name__)

RETRY_AFTER = "retry-after"  # as services.scheduler.servicer sends it


class _Undecodable:
    """Stands for a request whose bytes did not parse (why: the parser's message)."""

    def __init__(self, why: str):
        self.why = why


def _lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as e:
            return _Undecodable(str(e))

    return parse


async def _refuse_undecodable(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, _Undecodable):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, f"the request does not parse: {request.why}"
        )


class ClientLimits(grpc.aio.ServerInterceptor):
    """Server interceptor: per-client slots, stream write deadlines, clean parse errors."""

    def __init__(self, slots: ClientSlots, api_key: str, timeout_s: float, service: str) -> None:
        self._slots = slots
        self._api_key = api_key
        self._timeout_s = timeout_s
        self._prefix = f"/{service}/"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not (details.method or "").startswith(self._prefix):
            return handler
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, details),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler

    def _client(self, details: grpc.HandlerCallDetails, context: grpc.aio.ServicerContext) -> str:
        auth = dict(details.invocation_metadata or ()).get("authorization")
        token = bearer_token(auth if isinstance(auth, str) else None)
        return client_key(self._api_key, token, grpc_peer_host(context.peer()))

    def _stream(self, method: Any, details: grpc.HandlerCallDetails) -> Any:
        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> None:
            await _refuse_undecodable(request, context)
            client = self._client(details, context)
            if not self._slots.try_acquire(client):
                hint = ((RETRY_AFTER, f"{RETRY_AFTER_S:g}"),)
                await context.send_initial_metadata(hint)
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{self._slots.refusal()}; retry after {RETRY_AFTER_S:g}s",
                    trailing_metadata=hint,
                )
            relay = _Relay(
                method(request, context), lambda: self._slots.release(client), self._timeout_s
            )
            await relay.run(context)
            if relay.stalled:  # the request is long cancelled, its slot free: tell the client
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"the client read nothing of its stream for {self._timeout_s:g}s",
                )

        return behavior


class _Relay:
    """One stream's responses, written by the handler, watched by a timer.

    A write still pending after timeout_s means the client reads nothing (its
    flow-control window is full). Then the timer closes the method's stream (the
    request is cancelled on the workers, its KV freed) and gives the slot back at
    once, without waiting for the write: grpc completes that only when the client
    reads or leaves, and a cancelled write does not return before either. One timer
    per stream, re-armed, rather than a task and a timer per message."""

    def __init__(
        self, responses: AsyncGenerator[Any, None], release: Callable[[], None], timeout_s: float
    ) -> None:
        self._responses = responses
        self._release: Callable[[], None] | None = release
        self._timeout_s = timeout_s
        self._loop = asyncio.get_running_loop()
        self._since: float | None = None  # when the pending write began
        self._closing: asyncio.Future[None] | None = None
        self._timer = self._loop.call_later(timeout_s, self._check)

    @property
    def stalled(self) -> bool:
        return self._closing is not None

    async def run(self, context: grpc.aio.ServicerContext) -> None:
        """Writes every response; returns when they are done, or a stalled write is."""
        try:
            async for response in self._responses:
                self._since = self._loop.time()
                await context.write(response)
                self._since = None
                if self.stalled:
                    break
        finally:
            self._timer.cancel()
            await (self._closing or self._responses.aclose())
            self._give_back()

    def _check(self) -> None:
        """The timer: a write pending too long drops the stream; otherwise re-armed."""
        left = self._timeout_s
        if self._since is not None:
            left = self._since + self._timeout_s - self._loop.time()
        if left > 0:
            self._timer = self._loop.call_later(left, self._check)
            return
        log.info("stream dropped: the client read nothing for %gs", self._timeout_s)
        self._closing = asyncio.ensure_future(self._responses.aclose())  # suspended at a yield
        self._give_back()

    def _give_back(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


def _unary(method: Any) -> Any:
    async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _refuse_undecodable(request, context)
        return await method(request, context)

    return behavior
