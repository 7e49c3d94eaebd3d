"""The scheduler's client of the workers: protobuf on the wire, dataclasses inside.

The orchestrator calls workers only through ``WorkerClient``; every protobuf
message and every gRPC status the scheduler sees is built or read here.

1. ``prefill(worker, request)``: the prompt prefilled on a prefill worker ->
   ``PrefillResult`` (first token, timings, and an opaque ``KvTicket`` for the
   KV it now holds). A prompt the worker rejects raises ``InvalidRequest``;
   any other failure raises ``PrefillUnreachable`` (the caller may prefill
   elsewhere).
   ``prefill_stream(worker, request)`` (layer-wise): a ``KvTicket`` for the KV
   at once -- a decode worker can take it before the prompt has run -- then
   the ``PrefillResult``; the same errors, raised instead of either.
2. ``decode(worker, request, ticket)``: a stream of ``DecodeUpdate``. With a
   ticket the decode worker pulls that KV and continues from its first token;
   without one it prefills ``request``'s prompt itself. A rejected prompt
   raises ``InvalidRequest``; a broken stream raises ``DecodeLost``. Closing
   the iterator cancels the request. Requests go over one ``DecodeSession``
   per decode worker (``_Session``: a request is a message on a long-lived
   stream, not a call of its own); a worker without the method (UNIMPLEMENTED:
   an older version) gets one ``Decode`` call per request instead.
3. ``release(ticket)``: frees KV no decode worker took. Best effort: it does
   not raise on a worker error (the prefill worker's lease frees it anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from disagg.metrics.scheduler import kv_bytes
from disagg.policy.routing import WorkerView
from disagg.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from disagg.wire import sampling_to_pb
from services.scheduler.requests import GenerationRequest, InvalidRequest

log = logging.getLogger(__name__)

_RELEASE_TIMEOUT_S = 5.0


class PrefillUnreachable(RuntimeError):
    """The prefill worker failed the call (unreachable, deadline, draining, error)."""

    def __init__(self, code: str, details: str | None):
        super().__init__(f"{code} {details}")
        self.code = code  # the gRPC status name


class DecodeLost(RuntimeError):
    """The decode worker's stream broke (worker died, drained, unreachable)."""


@dataclass(frozen=True)
class KvTicket:
    """Prefilled KV held by a prefill worker: opaque to everyone but this module."""

    _handle: common_pb2.KvHandle

    @property
    def streamed(self) -> bool:
        """Taken while its prompt still runs (layer-wise): no first token in it."""
        return self._handle.state == common_pb2.KV_STATE_PREFILLING

    @property
    def nbytes(self) -> int:
        """Bytes of K and V the decode worker pulls for it."""
        lay, h = self._handle.layout, self._handle
        blocks = -(-h.num_tokens // max(1, lay.block_size)) if self.streamed else len(h.block_ids)
        return kv_bytes(
            blocks,
            lay.num_layers,
            lay.block_size,
            lay.num_kv_heads,
            lay.head_dim,
            lay.dtype,
        )


@dataclass(frozen=True)
class PrefillResult:
    handle: KvTicket
    first_token_id: int  # sampled by the prefill worker
    cached_tokens: int  # prompt tokens the worker's prefix cache served
    queue_ms: float
    prefill_ms: float


@dataclass(frozen=True)
class DecodeUpdate:
    """One message of a decode stream."""

    token_ids: tuple[int, ...]
    finish_reason: str | None = None  # on the last update: stop | length | error
    kv_transfer_ms: float = 0.0  # on the first update, after a pull
    prefill_ms: float = 0.0  # on the first update, when prefilled on the decode worker
    queue_ms: float = 0.0  # on the first update
    decode_ms: float = 0.0  # on the last update
    kv_transport: str = ""  # on the first update after a handoff: nixl | grpc | fallback


def prefill_request(req: GenerationRequest) -> worker_pb2.PrefillRequest:
    return worker_pb2.PrefillRequest(
        request_id=req.request_id,
        prompt_token_ids=req.prompt_token_ids,
        sampling=sampling_to_pb(req.sampling),
        cache_salt=req.cache_salt,
    )


def prefill_result(resp: worker_pb2.PrefillResponse) -> PrefillResult:
    return PrefillResult(
        handle=KvTicket(resp.handle),
        first_token_id=resp.handle.first_token_id,
        cached_tokens=resp.cached_tokens,
        queue_ms=resp.queue_ms,
        prefill_ms=resp.prefill_ms,
    )


def decode_request(req: GenerationRequest, ticket: KvTicket | None) -> worker_pb2.DecodeRequest:
    return worker_pb2.DecodeRequest(
        request_id=req.request_id,
        prompt_token_ids=req.prompt_token_ids,
        sampling=sampling_to_pb(req.sampling),
        handle=None if ticket is None else ticket._handle,
        cache_salt=req.cache_salt,
    )


def decode_update(resp: worker_pb2.DecodeResponse) -> DecodeUpdate:
    return DecodeUpdate(
        token_ids=tuple(resp.token_ids),
        finish_reason=resp.finish_reason or None,
        kv_transfer_ms=resp.kv_transfer_ms,
        prefill_ms=resp.prefill_ms,
        queue_ms=resp.queue_ms,
        decode_ms=resp.decode_ms,
        kv_transport=resp.kv_transport,
    )


def release_request(ticket: KvTicket) -> worker_pb2.ReleaseKvRequest:
    return worker_pb2.ReleaseKvRequest(request_id=ticket._handle.request_id, consumed=False)


def _rejected(e: grpc.aio.AioRpcError) -> bool:
    return e.code() == grpc.StatusCode.INVALID_ARGUMENT  # the prompt, not the worker


def _invalid(e: grpc.aio.AioRpcError, by: str) -> InvalidRequest:
    return InvalidRequest("prompt", e.details() or f"rejected by the {by} worker")


class WorkerClient:
    def __init__(
        self,
        channel_for: Callable[[str], grpc.aio.Channel],
        timeout_s: float,
        *,
        sessions: bool = True,
    ):
        """sessions: decode over one DecodeSession per worker (else a call per request)."""
        self._channel_for = channel_for  # one reused channel per address
        self._timeout_s = timeout_s  # deadline of a prefill call
        self._use_sessions = sessions
        self._sessions: dict[str, _Session] = {}  # decode worker address -> its session
        self._no_sessions: set[str] = set()  # without DecodeSession (until a restart)
        self.sessions_opened = 0  # DecodeSession calls made (a new one after each end)
        self._releasing: set[asyncio.Future[Any]] = set()  # ReleaseKv calls in flight

    async def prefill(self, worker: WorkerView, req: GenerationRequest) -> PrefillResult:
        stub = worker_pb2_grpc.PrefillWorkerStub(self._channel_for(worker.address))
        try:
            resp = await stub.Prefill(prefill_request(req), timeout=self._timeout_s)
        except asyncio.CancelledError:
            self._release_unanswered(worker.address, req.request_id)
            raise
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                self._release_unanswered(worker.address, req.request_id)
            if _rejected(e):
                raise _invalid(e, "prefill") from e
            raise PrefillUnreachable(e.code().name, e.details()) from e
        return prefill_result(resp)

    def _release_unanswered(self, address: str, request_id: str) -> None:
        """A Prefill call given up before its answer: the worker may have held the KV
        already (its answer on the way), and only its answer carried the handle. Released
        by id in the background; the worker sees our cancel first, so a prefill still
        running there is aborted, not held after this."""
        stub = worker_pb2_grpc.PrefillWorkerStub(self._channel_for(address))
        request = worker_pb2.ReleaseKvRequest(request_id=request_id, consumed=False)
        task = asyncio.ensure_future(stub.ReleaseKv(request, timeout=_RELEASE_TIMEOUT_S))
        self._releasing.add(task)
        task.add_done_callback(self._released)

    def _released(self, task: asyncio.Future[Any]) -> None:
        self._releasing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("release of an unanswered prefill failed: %s", task.exception())

    async def prefill_stream(
        self, worker: WorkerView, req: GenerationRequest
    ) -> AsyncGenerator[KvTicket | PrefillResult, None]:
        stub = worker_pb2_grpc.PrefillWorkerStub(self._channel_for(worker.address))
        request = worker_pb2.PrefillStreamRequest(prefill=prefill_request(req))
        call = stub.PrefillStream(request, timeout=self._timeout_s)
        try:
            first = True
            async for resp in call:
                yield KvTicket(resp.prefill.handle) if first else prefill_result(resp.prefill)
                first = False
        except grpc.aio.AioRpcError as e:
            if _rejected(e):
                raise _invalid(e, "prefill") from e
            raise PrefillUnreachable(e.code().name, e.details()) from e
        finally:
            call.cancel()

    async def decode(
        self, worker: WorkerView, req: GenerationRequest, ticket: KvTicket | None
    ) -> AsyncGenerator[DecodeUpdate, None]:
        if self._use_sessions and worker.address not in self._no_sessions:
            session, request = self._session(worker.address), decode_request(req, ticket)
            try:
                async with contextlib.aclosing(_session_updates(session, request, worker)) as ups:
                    async for up in ups:
                        yield up
                return
            except _SessionUnimplemented:  # raised before any update
                log.info("decode worker %s has no DecodeSession: a call per request",
                         worker.worker_id)  # fmt: skip
                self._no_sessions.add(worker.address)
        async with contextlib.aclosing(self._decode_call(worker, req, ticket)) as updates:
            async for up in updates:
                yield up

    def _session(self, address: str) -> _Session:
        session = self._sessions.get(address)
        if session is None or session.closed:
            stub = worker_pb2_grpc.DecodeWorkerStub(self._channel_for(address))
            session = _Session(stub, lambda s: self._ended(address, s))
            self._sessions[address] = session
            self.sessions_opened += 1
        return session

    def _ended(self, address: str, session: _Session) -> None:
        if self._sessions.get(address) is session:  # a worker gone for good leaves nothing
            del self._sessions[address]

    async def close(self) -> None:
        """Ends every decode session (their requests get DecodeLost)."""
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()

    async def _decode_call(
        self, worker: WorkerView, req: GenerationRequest, ticket: KvTicket | None
    ) -> AsyncGenerator[DecodeUpdate, None]:
        stub = worker_pb2_grpc.DecodeWorkerStub(self._channel_for(worker.address))
        call = stub.Decode(decode_request(req, ticket))
        try:
            async for resp in call:
                yield decode_update(resp)
        except grpc.aio.AioRpcError as e:
            if _rejected(e):
                raise _invalid(e, "decode") from e
            raise DecodeLost(f"{worker.worker_id}: {e.code().name} {e.details()}") from e
        finally:
            call.cancel()

    async def release(self, ticket: KvTicket) -> None:
        stub = worker_pb2_grpc.PrefillWorkerStub(self._channel_for(ticket._handle.owner_address))
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.ReleaseKv(release_request(ticket), timeout=_RELEASE_TIMEOUT_S)


class _SessionUnimplemented(Exception):
    """The decode worker has no DecodeSession (an older version)."""


class _Session:
    """One DecodeSession call to one decode worker, shared by its requests.

    ``start`` queues a request's start and returns the queue its updates arrive
    on (``DecodeSessionUpdate``s, then -- should the session end first -- the
    ``AioRpcError`` or ``DecodeLost`` that ended it). One writer sends what was
    queued since its last write as one message; one reader hands each update to
    its request's queue. A request that stops early is cancelled on the worker
    (``forget``). The session ending, however it ends, ends every request on it;
    the next request opens a new one.
    """

    def __init__(
        self, stub: worker_pb2_grpc.DecodeWorkerStub, on_end: Callable[[_Session], None]
    ) -> None:
        self._on_end = on_end
        self._call = stub.DecodeSession()
        self._queues: dict[str, asyncio.Queue[object]] = {}
        self._starts: list[worker_pb2.DecodeRequest] = []
        self._cancels: list[str] = []
        self._wake = asyncio.Event()
        self.closed = False
        self._reader = asyncio.ensure_future(self._read())
        self._writer = asyncio.ensure_future(self._write())

    def start(self, request: worker_pb2.DecodeRequest) -> asyncio.Queue[object]:
        queue: asyncio.Queue[object] = asyncio.Queue()
        rid = request.request_id
        if self.closed or rid in self._queues:
            why = "closed" if self.closed else f"request_id {rid!r} already on it"
            queue.put_nowait(DecodeLost(f"decode session {why}"))
            return queue
        self._queues[rid] = queue
        self._starts.append(request)
        self._wake.set()
        return queue

    def forget(self, rid: str, cancel: bool) -> None:
        """The request is over here; cancel: tell the worker to stop it."""
        if self._queues.pop(rid, None) is not None and cancel and not self.closed:
            self._cancels.append(rid)
            self._wake.set()

    async def close(self) -> None:
        self._end(DecodeLost("the scheduler closed the decode session"))
        self._call.cancel()
        await asyncio.gather(self._reader, self._writer, return_exceptions=True)

    async def _write(self) -> None:
        try:
            while not self.closed:
                await self._wake.wait()
                self._wake.clear()
                if self._starts or self._cancels:
                    msg = worker_pb2.DecodeSessionRequest(start=self._starts, cancel=self._cancels)
                    self._starts, self._cancels = [], []
                    await self._call.write(msg)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
            log.debug("decode session write ended: %s", e)  # the reader reports the status
        except grpc.aio.UsageError as e:  # written after the call ended: the reader reports
            log.debug("decode session write ended: %s", e)

    async def _read(self) -> None:
        try:
            async for resp in self._call:
                for update in resp.updates:
                    queue = self._queues.get(update.request_id)
                    if queue is not None:
                        queue.put_nowait(update)
            self._end(DecodeLost("the decode worker ended the session (draining)"))
        except grpc.aio.AioRpcError as e:
            self._end(e)
        except asyncio.CancelledError:
            self._end(DecodeLost("the decode session was cancelled"))
            raise

    def _end(self, why: object) -> None:
        if self.closed:
            return
        self.closed = True
        self._wake.set()  # the writer sees closed and returns
        for queue in self._queues.values():
            queue.put_nowait(why)
        self._queues.clear()
        self._on_end(self)


_CODES = {c.value[0]: c for c in grpc.StatusCode}


async def _session_updates(
    session: _Session, request: worker_pb2.DecodeRequest, worker: WorkerView
) -> AsyncGenerator[DecodeUpdate, None]:
    """One request's updates off its session, as ``decode`` yields them; the errors
    ``decode`` raises (``_SessionUnimplemented``: fall back to a Decode call)."""
    queue = session.start(request)
    finished = False
    try:
        while not finished:
            item = await queue.get()
            finished = True  # unless it is a response that does not finish the request
            if isinstance(item, grpc.aio.AioRpcError):  # the session's end
                if item.code() == grpc.StatusCode.UNIMPLEMENTED:
                    raise _SessionUnimplemented()
                raise DecodeLost(f"{worker.worker_id}: {item.code().name} {item.details()}")
            if isinstance(item, DecodeLost):
                raise DecodeLost(f"{worker.worker_id}: {item}")
            assert isinstance(item, worker_pb2.DecodeSessionUpdate)
            if item.code:
                code = _CODES.get(item.code, grpc.StatusCode.UNKNOWN)
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidRequest("prompt", item.details or "rejected by the decode worker")
                raise DecodeLost(f"{worker.worker_id}: {code.name} {item.details}")
            up = decode_update(item.response)
            finished = up.finish_reason is not None
            yield up
    finally:
        session.forget(request.request_id, cancel=not finished)
