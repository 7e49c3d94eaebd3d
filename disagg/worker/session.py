"""Sessions: many requests of one kind over one long-lived stream.

A scheduler keeps one session per worker (``DecodeSession`` on a decode
worker, ``PrefillSession`` on a prefill worker), so a request costs it a
message rather than a call (a gRPC call is most of what a relaying process
spends on a request: ``benchmarks/grpc_floor.py``). Each ``start`` runs as its
own task through the same code as the method's own call (``Kind.responses``);
where that call would abort, the request alone ends with the status in an
update. A ``cancel`` cancels the request's task, which aborts it in the engine
and frees its blocks, as a cancelled call does; ``Kind.on_given_up`` is told of
every request given up before its last response went out (a cancel, or the
session's end) -- and of a cancel that comes after it went out, which the
scheduler sent before reading it.

Responses of all requests go out through one writer: what piles up while a
write is in flight (several requests' tokens from one engine step, several
prefills' answers) leaves as one message. The session ending -- the scheduler
closing it, the connection breaking -- cancels every request still on it. A
draining worker refuses new starts (UNAVAILABLE, so the scheduler runs them
elsewhere) and ends each session once its requests are done. The worker's RPC
limit bounds the requests on its sessions as it bounds calls
(RESOURCE_EXHAUSTED beyond it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from disagg.worker.validation import Aborter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kind:
    """What a session carries: its messages and how one request runs.

    responses(request, aborter): the request's responses, as its own call would
    send them (errors end it through ``aborter.abort``); is_last(response): it
    ends the request; update / message: the session's per-request update and
    outgoing message types (``request_id``, ``response``, ``code``, ``details``;
    ``updates``); on_given_up(request_id): the request was given up before the
    scheduler read its last response (None: nothing to undo)."""

    name: str  # "decode" | "prefill": in error details
    responses: Callable[[Any, Aborter], AsyncGenerator[Any, None]]
    is_last: Callable[[Any], bool]
    update: type
    message: type
    on_given_up: Callable[[str], None] | None = None


class RequestAborted(Exception):
    """One request of a session ended with a status (what its call would abort with)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class _RequestContext:
    """Stands for the call's context for one request: abort ends the request only."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise RequestAborted(code, details)


_REQUEST = _RequestContext()


class _Session:
    def __init__(self, sessions: Sessions) -> None:
        self._sessions = sessions
        self._kind = sessions.kind
        self._draining = sessions.draining
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._given_up: set[str] = set()  # cancelled by the scheduler while running
        self._out: list[Any] = []
        self._wake = asyncio.Event()
        self._reading = True

    async def serve(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        reader = asyncio.ensure_future(self._read(requests))
        drained = asyncio.ensure_future(self._draining.wait())
        drained.add_done_callback(lambda _: self._wake.set())
        try:
            while True:
                if self._out:  # what came during the last write goes as one message
                    batch, self._out = self._out, []
                    await context.write(self._kind.message(updates=batch))
                    continue
                if not self._tasks and (not self._reading or self._draining.is_set()):
                    return
                await self._wake.wait()
                self._wake.clear()
        finally:
            drained.cancel()
            reader.cancel()
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(reader, *tasks, return_exceptions=True)
            for update in self._out:  # answered, never sent: nobody will read it
                if not update.code:
                    self._give_up(update.request_id)

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        try:
            async for msg in requests:
                for req in msg.start:
                    self._start(req)
                for rid in msg.cancel:
                    task = self._tasks.get(rid)
                    if task is not None:
                        self._given_up.add(rid)
                        task.cancel()
                    else:  # answered already: the scheduler gave up before reading it
                        self._give_up(rid)
        finally:
            self._reading = False  # the scheduler closed its side: end with the requests
            self._wake.set()

    def _start(self, req: Any) -> None:
        rid, name = req.request_id, self._kind.name
        sessions = self._sessions
        if self._draining.is_set():
            self._error(rid, grpc.StatusCode.UNAVAILABLE, f"the {name} worker is draining")
        elif rid in self._tasks:
            why = f"request_id: {rid!r} is running on this session"
            self._error(rid, grpc.StatusCode.ALREADY_EXISTS, why)
        elif sessions.active >= sessions.max_requests:
            why = f"{sessions.active} requests in flight on this {name} worker's sessions (limit)"
            self._error(rid, grpc.StatusCode.RESOURCE_EXHAUSTED, why)
        else:
            sessions.active += 1
            task = asyncio.ensure_future(self._run(req))
            self._tasks[rid] = task
            # on the task, not in it: one cancelled before its first step runs no finally
            task.add_done_callback(lambda t: self._done(rid, t))

    def _done(self, rid: str, task: asyncio.Task[None]) -> None:
        self._sessions.active -= 1
        if self._tasks.get(rid) is task:
            del self._tasks[rid]
        if task.cancelled() or rid in self._given_up:  # by a cancel or the session's end
            self._given_up.discard(rid)
            self._give_up(rid)
        self._wake.set()

    async def _run(self, req: Any) -> None:
        rid, finished = req.request_id, False
        kind = self._kind
        try:
            async with contextlib.aclosing(kind.responses(req, _REQUEST)) as responses:
                async for resp in responses:
                    finished = kind.is_last(resp)
                    self._emit(kind.update(request_id=rid, response=resp))
            if not finished:
                self._error(rid, grpc.StatusCode.INTERNAL, "ended without a finish")
        except RequestAborted as e:
            self._error(rid, e.code, e.details)
        except asyncio.CancelledError:
            raise  # cancelled by the scheduler or the session's end: nobody to tell
        except Exception as e:
            log.exception("%s session request failed request_id=%s", kind.name, rid)
            self._error(rid, grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")

    def _give_up(self, rid: str) -> None:
        if self._kind.on_given_up is not None:
            self._kind.on_given_up(rid)

    def _error(self, rid: str, code: grpc.StatusCode, details: str) -> None:
        self._emit(self._kind.update(request_id=rid, code=code.value[0], details=details))

    def _emit(self, update: Any) -> None:
        self._out.append(update)
        self._wake.set()


class Sessions:
    """A worker's sessions of one kind: each served by ``serve``; ``drain`` for all.
    At most ``max_requests`` requests run on them at once (more: RESOURCE_EXHAUSTED,
    as a call over the server's RPC limit gets)."""

    def __init__(self, kind: Kind, max_requests: int) -> None:
        if max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {max_requests}")
        self.kind = kind
        self.max_requests = max_requests
        self.active = 0  # requests running on every session
        self.draining = asyncio.Event()

    async def serve(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        await _Session(self).serve(requests, context)

    def drain(self) -> None:
        self.draining.set()
