"""What the client returns: frozen values, converted from protobuf in one place (here).

``GenerateEvent`` is one message of a ``generate()`` stream; the last one has
``finish_reason``, ``usage`` and ``timings``. ``Completion`` is a whole stream
collected (``complete()``). ``WorkerInfo`` and ``Health`` answer
``list_workers()`` and ``health()``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc

from disagg.client.errors import make_error
from disagg.v1 import common_pb2, scheduler_pb2


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0  # the prompt as the model saw it (after a chat template)
    completion_tokens: int = 0  # tokens generated (EOS included when it ended the stream)
    cached_prompt_tokens: int = 0  # prompt tokens served from a prefix cache


@dataclass(frozen=True)
class Timings:
    """Where the request's time went on the server, milliseconds."""

    queue_ms: float = 0.0  # admission until a worker started on it
    prefill_ms: float = 0.0  # the prompt's forward pass
    kv_transfer_ms: float = 0.0  # the decode worker pulling the KV blocks (0: collocated)
    decode_ms: float = 0.0  # first decode step until the last token
    ttft_ms: float = 0.0  # arrival until the first token left the scheduler
    e2e_ms: float = 0.0  # arrival until the final response
    kv_transport: str = ""  # how the KV reached the decode worker: nixl | grpc | fallback


@dataclass(frozen=True)
class GenerateEvent:
    """One response of a Generate stream."""

    request_id: str
    token_ids: tuple[int, ...]  # tokens new in this event
    text: str  # text new in this event (may be empty while a character is incomplete)
    finish_reason: str | None = None  # last event only: stop | length | cancelled | error
    usage: Usage | None = None  # last event only
    timings: Timings | None = None  # last event only
    prefill_worker: str = ""  # last event only: the worker that prefilled the prompt
    decode_worker: str = ""  # last event only: the worker that decoded

    @property
    def final(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class Completion:
    """A whole stream: the concatenated text and token ids, and the last event's totals."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    usage: Usage
    timings: Timings
    prefill_worker: str
    decode_worker: str


class Collector:
    """Folds events into a Completion (``complete()`` of both clients)."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self._ids: list[int] = []
        self._last: GenerateEvent | None = None

    def add(self, ev: GenerateEvent) -> None:
        self._text.append(ev.text)
        self._ids.extend(ev.token_ids)
        self._last = ev

    def add_all(self, events: Iterable[GenerateEvent]) -> Completion:
        for ev in events:
            self.add(ev)
        return self.result()

    def result(self) -> Completion:
        last = self._last
        if last is None or not last.final:
            raise make_error(grpc.StatusCode.UNKNOWN, "the stream ended without a final response")
        return Completion(
            request_id=last.request_id,
            text="".join(self._text),
            token_ids=tuple(self._ids),
            finish_reason=last.finish_reason or "",
            usage=last.usage or Usage(),
            timings=last.timings or Timings(),
            prefill_worker=last.prefill_worker,
            decode_worker=last.decode_worker,
        )


_ROLES = {common_pb2.WORKER_ROLE_PREFILL: "prefill", common_pb2.WORKER_ROLE_DECODE: "decode"}


@dataclass(frozen=True)
class WorkerInfo:
    """A worker as the scheduler sees it (its last heartbeat)."""

    worker_id: str
    role: str  # prefill | decode | unspecified
    address: str  # host:port other services dial
    model: str
    free_blocks: int  # KV blocks free in its pool
    total_blocks: int
    running_requests: int
    waiting_requests: int
    queued_prefill_tokens: int
    heartbeat_unix_ms: int
    proto: common_pb2.WorkerInfo = field(repr=False, compare=False)  # every field, as received


@dataclass(frozen=True)
class Health:
    """grpc.health.v1 status of one service ('' = the whole server)."""

    service: str
    status: str  # SERVING | NOT_SERVING | SERVICE_UNKNOWN | UNKNOWN

    @property
    def serving(self) -> bool:
        return self.status == "SERVING"


def event_from_pb(resp: scheduler_pb2.GenerateResponse) -> GenerateEvent:
    if not resp.finish_reason:
        return GenerateEvent(resp.request_id, tuple(resp.token_ids), resp.text)
    u, t = resp.usage, resp.timings
    return GenerateEvent(
        request_id=resp.request_id,
        token_ids=tuple(resp.token_ids),
        text=resp.text,
        finish_reason=resp.finish_reason,
        usage=Usage(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens),
        timings=Timings(
            t.queue_ms,
            t.prefill_ms,
            t.kv_transfer_ms,
            t.decode_ms,
            t.ttft_ms,
            t.e2e_ms,
            t.kv_transport,
        ),
        prefill_worker=resp.prefill_worker,
        decode_worker=resp.decode_worker,
    )


def worker_from_pb(w: common_pb2.WorkerInfo) -> WorkerInfo:
    return WorkerInfo(
        worker_id=w.worker_id,
        role=_ROLES.get(w.role, "unspecified"),
        address=w.address,
        model=w.model,
        free_blocks=w.free_blocks,
        total_blocks=w.total_blocks,
        running_requests=w.running_requests,
        waiting_requests=w.waiting_requests,
        queued_prefill_tokens=w.queued_prefill_tokens,
        heartbeat_unix_ms=w.heartbeat_unix_ms,
        proto=w,
    )
