"""DecodeSession: many Decode requests over one long-lived stream.

A scheduler keeps one session per decode worker, so a request costs it a
message rather than a call (a gRPC call is most of what a relaying process
spends on a request: ``benchmarks/grpc_floor.py``). Each ``start`` runs as its
own task through the same code as a Decode call (``DecodeServicer.responses``);
where that call would abort, the request alone ends with the status in an
update. A ``cancel`` cancels the request's task, which aborts it in the engine
and frees its blocks, as a cancelled Decode call does.

Responses of all requests go out through one writer: what piles up while a
write is in flight (several requests' tokens from one engine step) leaves as
one message. The session ending -- the scheduler closing it, the connection
breaking -- cancels every request still on it. A draining worker refuses new
starts (UNAVAILABLE, so the scheduler decodes them elsewhere) and ends each
session once its requests are done. The worker's RPC limit bounds the requests
on its sessions as it bounds calls (RESOURCE_EXHAUSTED beyond it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import grpc

from disagg.v1 import worker_pb2
from disagg.worker.validation import Aborter

log = logging.getLogger(__name__)

Responses = Callable[
    [worker_pb2.DecodeRequest, Aborter], AsyncGenerator[worker_pb2.DecodeResponse, None]
]


class RequestAborted(Exception):
    """One request of a session ended with a status (what Decode would abort with)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class _RequestContext:
    """Stands for the call's context for one request: abort ends the request only."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise RequestAborted(code, details)


_REQUEST = _RequestContext()


def _error(rid: str, code: grpc.StatusCode, details: str) -> worker_pb2.DecodeSessionUpdate:
    return worker_pb2.DecodeSessionUpdate(request_id=rid, code=code.value[0], details=details)


class _Session:
    def __init__(self, sessions: DecodeSessions) -> None:
        self._sessions = sessions
        self._responses = sessions.responses
        self._draining = sessions.draining
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._out: list[worker_pb2.DecodeSessionUpdate] = []
        self._wake = asyncio.Event()
        self._reading = True

    async def serve(
        self,
        requests: AsyncIterator[worker_pb2.DecodeSessionRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        reader = asyncio.ensure_future(self._read(requests))
        drained = asyncio.ensure_future(self._draining.wait())
        drained.add_done_callback(lambda _: self._wake.set())
        try:
            while True:
                if self._out:  # what came during the last write goes as one message
                    batch, self._out = self._out, []
                    await context.write(worker_pb2.DecodeSessionResponse(updates=batch))
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

    async def _read(self, requests: AsyncIterator[worker_pb2.DecodeSessionRequest]) -> None:
        try:
            async for msg in requests:
                for req in msg.start:
                    self._start(req)
                for rid in msg.cancel:
                    task = self._tasks.get(rid)
                    if task is not None:
                        task.cancel()
        finally:
            self._reading = False  # the scheduler closed its side: end with the requests
            self._wake.set()

    def _start(self, req: worker_pb2.DecodeRequest) -> None:
        rid = req.request_id
        sessions = self._sessions
        if self._draining.is_set():
            self._emit(_error(rid, grpc.StatusCode.UNAVAILABLE, "the decode worker is draining"))
        elif rid in self._tasks:
            why = f"request_id: {rid!r} is running on this session"
            self._emit(_error(rid, grpc.StatusCode.ALREADY_EXISTS, why))
        elif sessions.active >= sessions.max_requests:
            why = f"{sessions.active} requests in flight on this decode worker's sessions (limit)"
            self._emit(_error(rid, grpc.StatusCode.RESOURCE_EXHAUSTED, why))
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
        self._wake.set()

    async def _run(self, req: worker_pb2.DecodeRequest) -> None:
        rid, finished = req.request_id, False
        try:
            async with contextlib.aclosing(self._responses(req, _REQUEST)) as responses:
                async for resp in responses:
                    finished = bool(resp.finish_reason)
                    self._emit(worker_pb2.DecodeSessionUpdate(request_id=rid, response=resp))
            if not finished:
                self._emit(_error(rid, grpc.StatusCode.INTERNAL, "ended without a finish"))
        except RequestAborted as e:
            self._emit(_error(rid, e.code, e.details))
        except asyncio.CancelledError:
            pass  # cancelled by the scheduler or the session's end: nobody to tell
        except Exception as e:
            log.exception("decode session request failed request_id=%s", rid)
            self._emit(_error(rid, grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"))

    def _emit(self, update: worker_pb2.DecodeSessionUpdate) -> None:
        self._out.append(update)
        self._wake.set()


class DecodeSessions:
    """The decode worker's sessions: each served by ``serve``; ``drain`` for all.
    At most ``max_requests`` requests run on them at once (more: RESOURCE_EXHAUSTED,
    as a Decode call over the server's RPC limit gets)."""

    def __init__(self, responses: Responses, max_requests: int) -> None:
        if max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, got {max_requests}")
        self.responses = responses
        self.max_requests = max_requests
        self.active = 0  # requests running on every session
        self.draining = asyncio.Event()

    async def serve(
        self,
        requests: AsyncIterator[worker_pb2.DecodeSessionRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        await _Session(self).serve(requests, context)

    def drain(self) -> None:
        self.draining.set()
