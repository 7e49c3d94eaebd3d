"""The scheduler's client of the workers: protobuf on the wire, dataclasses inside.

The orchestrator calls workers only through ``WorkerClient``; every protobuf
message and every gRPC status the scheduler sees is built or read here.

1. ``prefill(worker, request)``: the prompt prefilled on a prefill worker ->
   ``PrefillResult`` (first token, timings, and an opaque ``KvTicket`` for the
   KV it now holds). A prompt the worker rejects raises ``InvalidRequest``;
   any other failure raises ``PrefillUnreachable`` (the caller may prefill
   elsewhere). Requests go over one ``PrefillSession`` per prefill worker; one
   given up before its answer (cancelled, past the deadline) is cancelled on
   the worker, which frees KV it may hold already. A worker without the
   method gets one ``Prefill`` call per request.
   ``prefill_stream(worker, request)`` (layer-wise): a ``KvTicket`` for the KV
   at once -- a decode worker can take it before the prompt has run -- then
   the ``PrefillResult``; the same errors, raised instead of either.
2. ``decode(worker, request, ticket)``: a stream of ``DecodeUpdate``. With a
   ticket the decode worker pulls that KV and continues from its first token;
   without one it prefills ``request``'s prompt itself. A rejected prompt
   raises ``InvalidRequest``; a broken stream raises ``DecodeLost``. Closing
   the iterator cancels the request. Requests go over one ``DecodeSession``
   per decode worker; a worker without the method gets one ``Decode`` call
   per request instead.
   Sessions (``_Session``): a request is a message on a long-lived stream,
   not a call of its own (a gRPC call is most of what the scheduler spends on
   a request); a worker without the method (UNIMPLEMENTED: an older version
   during a rolling upgrade) is called per request until the scheduler
   restarts.
3. ``release(ticket)``: frees KV no decode worker took: a cancel on the owner's
   open PrefillSession (a message), else a ``ReleaseKv`` call. Best effort: it
   does not raise on a worker error (the prefill worker's lease frees it anyway).
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
        prefill_sessions: bool = True,
    ):
        """sessions: decode over one DecodeSession per worker (else a call per request);
        prefill_sessions: the same for prefills (PrefillSession)."""
        self._channel_for = channel_for  # one reused channel per address
        self._timeout_s = timeout_s  # deadline of a prefill
        self._use_sessions = {_DECODE: sessions, _PREFILL: prefill_sessions}
        self._sessions: dict[tuple[str, str], _Session] = {}  # (kind, address) -> session
        self._no_sessions: set[tuple[str, str]] = set()  # without the method (until a restart)
        self.sessions_opened = 0  # session calls made (a new one after each end)
        self._releasing: set[asyncio.Future[Any]] = set()  # ReleaseKv calls in flight

    async def prefill(self, worker: WorkerView, req: GenerationRequest) -> PrefillResult:
        if self._session_for(_PREFILL, worker.address):
            try:
                return await self._prefill_on_session(worker, req)
            except _SessionUnimplemented:  # raised before the request ran
                log.info("prefill worker %s has no PrefillSession: a call per request",
                         worker.worker_id)  # fmt: skip
                self._no_sessions.add((_PREFILL, worker.address))
        return await self._prefill_call(worker, req)

    async def _prefill_on_session(
        self, worker: WorkerView, req: GenerationRequest
    ) -> PrefillResult:
        session = self._session(_PREFILL, worker.address)
        rid = req.request_id
        answer = session.start(prefill_request(req))
        item: object = None
        try:
            async with asyncio.timeout(self._timeout_s):
                item = await answer.get()
        except TimeoutError as e:
            why = f"no answer within {self._timeout_s:g} s"
            raise PrefillUnreachable(grpc.StatusCode.DEADLINE_EXCEEDED.name, why) from e
        finally:  # given up unanswered (cancelled, deadline): the worker frees what it held
            session.forget(rid, cancel=item is None)
        if isinstance(item, grpc.aio.AioRpcError):  # the session's end
            if item.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise _SessionUnimplemented()
            raise PrefillUnreachable(item.code().name, item.details())
        if isinstance(item, _SessionEnded):
            raise PrefillUnreachable(grpc.StatusCode.UNAVAILABLE.name, str(item))
        assert isinstance(item, worker_pb2.PrefillSessionUpdate)
        if item.code:
            code = _CODES.get(item.code, grpc.StatusCode.UNKNOWN)
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidRequest("prompt", item.details or "rejected by the prefill worker")
            raise PrefillUnreachable(code.name, item.details)
        return prefill_result(item.response)

    async def _prefill_call(self, worker: WorkerView, req: GenerationRequest) -> PrefillResult:
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
        if self._session_for(_DECODE, worker.address):
            session, request = self._session(_DECODE, worker.address), decode_request(req, ticket)
            try:
                async with contextlib.aclosing(_session_updates(session, request, worker)) as ups:
                    async for up in ups:
                        yield up
                return
            except _SessionUnimplemented:  # raised before any update
                log.info("decode worker %s has no DecodeSession: a call per request",
                         worker.worker_id)  # fmt: skip
                self._no_sessions.add((_DECODE, worker.address))
        async with contextlib.aclosing(self._decode_call(worker, req, ticket)) as updates:
            async for up in updates:
                yield up

    def _session_for(self, kind: str, address: str) -> bool:
        return self._use_sessions[kind] and (kind, address) not in self._no_sessions

    def _session(self, kind: str, address: str) -> _Session:
        key = (kind, address)
        session = self._sessions.get(key)
        if session is None or session.closed:
            channel = self._channel_for(address)
            if kind == _PREFILL:
                call = worker_pb2_grpc.PrefillWorkerStub(channel).PrefillSession()
                message: Callable[..., Any] = worker_pb2.PrefillSessionRequest
            else:
                call = worker_pb2_grpc.DecodeWorkerStub(channel).DecodeSession()
                message = worker_pb2.DecodeSessionRequest
            session = _Session(kind, call, message, lambda s: self._ended(key, s))
            self._sessions[key] = session
            self.sessions_opened += 1
        return session

    def _ended(self, key: tuple[str, str], session: _Session) -> None:
        if self._sessions.get(key) is session:  # a worker gone for good leaves nothing
            del self._sessions[key]

    async def close(self) -> None:
        """Ends every session (their requests get DecodeLost / PrefillUnreachable)."""
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
        address = ticket._handle.owner_address
        session = self._sessions.get((_PREFILL, address))
        if session is not None and session.cancel(ticket._handle.request_id):
            return  # a message on the owner's open session: freed as by ReleaseKv
        stub = worker_pb2_grpc.PrefillWorkerStub(self._channel_for(address))
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.ReleaseKv(release_request(ticket), timeout=_RELEASE_TIMEOUT_S)


class _SessionUnimplemented(Exception):
    """The worker has no session method (an older version)."""


class _SessionEnded(Exception):
    """The session ended without a status of its own (closed, drained, cancelled)."""


_PREFILL, _DECODE = "prefill", "decode"
# Prompt tokens in one session message: at most ~5 bytes a token on the wire, 2.5 MiB.
BATCH_PROMPT_TOKENS = 1 << 19


class _Session:
    """One session call (DecodeSession, PrefillSession) to one worker, shared by
    its requests.

    ``start`` queues a request's start and returns the queue its updates arrive
    on (``DecodeSessionUpdate``s / a ``PrefillSessionUpdate``, then -- should
    the session end first -- the ``AioRpcError`` or ``_SessionEnded`` that ended
    it). One writer sends what was queued since its last write as one message;
    one reader hands each update to its request's queue. A request that stops
    early is cancelled on the worker (``forget``). The session ending, however
    it ends, ends every request on it; the next request opens a new one.
    """

    def __init__(
        self,
        kind: str,
        call: Any,
        message: Callable[..., Any],
        on_end: Callable[[_Session], None],
    ) -> None:
        self._kind = kind
        self._on_end = on_end
        self._call = call
        self._message = message  # (start=[...], cancel=[...]) -> the request message
        self._queues: dict[str, asyncio.Queue[object]] = {}
        self._starts: list[Any] = []
        self._cancels: list[str] = []
        self._wake = asyncio.Event()
        self.closed = False
        self._reader = asyncio.ensure_future(self._read())
        self._writer = asyncio.ensure_future(self._write())

    def start(self, request: Any) -> asyncio.Queue[object]:
        queue: asyncio.Queue[object] = asyncio.Queue()
        rid = request.request_id
        if self.closed or rid in self._queues:
            why = "closed" if self.closed else f"request_id {rid!r} already on it"
            queue.put_nowait(_SessionEnded(f"{self._kind} session {why}"))
            return queue
        self._queues[rid] = queue
        self._starts.append(request)
        self._wake.set()
        return queue

    def forget(self, rid: str, cancel: bool) -> None:
        """The request is over here; cancel: tell the worker to stop it."""
        if self._queues.pop(rid, None) is not None and cancel:
            self.cancel(rid)

    def cancel(self, rid: str) -> bool:
        """Sends a cancel for rid (on a PrefillSession, an answered request's KV is freed
        by it); False: the session is closed, nothing sent."""
        if self.closed:
            return False
        self._cancels.append(rid)
        self._wake.set()
        return True

    async def close(self) -> None:
        self._end(_SessionEnded(f"the scheduler closed the {self._kind} session"))
        self._call.cancel()
        await asyncio.gather(self._reader, self._writer, return_exceptions=True)

    async def _write(self) -> None:
        try:
            while not self.closed:
                await self._wake.wait()
                self._wake.clear()
                while not self.closed and (self._starts or self._cancels):
                    starts = self._batch()
                    msg = self._message(start=starts, cancel=self._cancels)
                    self._cancels = []
                    await self._call.write(msg)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
            log.debug("%s session write ended: %s", self._kind, e)  # the reader reports it
        except grpc.aio.UsageError as e:  # written after the call ended: the reader reports
            log.debug("%s session write ended: %s", self._kind, e)

    def _batch(self) -> list[Any]:
        """The starts of the next message, taken off the queue: as many as fit in
        BATCH_PROMPT_TOKENS prompt tokens (one at least), so that what piled up during a
        write stays far under the message size limit (16 MiB) even with long prompts."""
        n, tokens = 0, 0
        for start in self._starts:
            tokens += len(start.prompt_token_ids)
            if n and tokens > BATCH_PROMPT_TOKENS:
                break
            n += 1
        starts, self._starts = self._starts[:n], self._starts[n:]
        return starts

    async def _read(self) -> None:
        try:
            async for resp in self._call:
                for update in resp.updates:
                    queue = self._queues.get(update.request_id)
                    if queue is not None:
                        queue.put_nowait(update)
            self._end(_SessionEnded(f"the {self._kind} worker ended the session (draining)"))
        except grpc.aio.AioRpcError as e:
            self._end(e)
        except asyncio.CancelledError:
            self._end(_SessionEnded(f"the {self._kind} session was cancelled"))
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
            if isinstance(item, _SessionEnded):
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
