"""What one client may cost the scheduler, for both front ends (docs/adr/0008).

1. Who: a client is its API key when one is configured (a hash of it: keys
   never sit in memory tables or logs), else its peer address (host, no port).
2. How many at once: ``ClientSlots`` counts each client's requests in flight
   and refuses one over ``max_inflight_per_client`` at once (HTTP 429 /
   RESOURCE_EXHAUSTED, before the body is read or the prompt tokenized), so one
   client cannot fill the scheduler's ``max_inflight`` alone.
3. How big: ``build_off_loop`` refuses a prompt that cannot fit the context by
   its length alone (no tokenizing), then tokenizes a long one in a thread, so
   the event loop that relays every stream never stalls on one prompt. The body
   / message size limit itself is the servers' (aiohttp ``client_max_size``,
   gRPC ``max_receive_message_length``).
4. How slow: the front ends drop a client that sends no more of its body, or
   reads none of its stream, for ``client_timeout_s`` (FrontLimits), which
   frees its slot, its admission and its KV.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from disagg.tokenization.prompts import PromptError, check_prompt_size, prompt_chars
from services.scheduler.requests import (
    GenerationRequest,
    InvalidRequest,
    RawRequest,
    RequestFactory,
)

# Prompts shorter than this are tokenized on the loop: a thread hop costs more.
OFF_LOOP_CHARS = 2048
RETRY_AFTER_S = 1.0  # the hint of a per-client refusal: a slot frees when a stream ends


@dataclass(frozen=True)
class FrontLimits:
    """The limits both front ends apply, from SchedulerConfig."""

    max_body_bytes: int = 1 << 20  # largest HTTP body / gRPC message
    client_timeout_s: float = 30.0  # body unsent / stream unread this long: dropped
    keepalive_s: float = 75.0  # idle HTTP keep-alive connections close after this

    @classmethod
    def of(cls, cfg: Any) -> FrontLimits:
        return cls(cfg.max_body_bytes, cfg.client_timeout_s, cfg.http_keepalive_s)


def client_key(api_key: str, presented: str | None, peer_host: str) -> str:
    """A client's identity: its key's hash when keys are configured, else its host."""
    if api_key:
        return "key:" + hashlib.sha256((presented or "").encode()).hexdigest()[:16]
    return "peer:" + peer_host


def bearer_token(header: str | None) -> str:
    """The token of an 'authorization: Bearer TOKEN' value ('' when none)."""
    scheme, _, token = (header or "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def grpc_peer_host(peer: str) -> str:
    """The host of a grpc peer string: 'ipv4:1.2.3.4:5' -> '1.2.3.4', 'ipv6:[::1]:5' -> '::1'."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    return peer  # unix sockets and the like: one client per path


class ClientSlots:
    """In-flight requests per client, capped (0 = no cap). Pure bookkeeping; one per process,
    shared by the HTTP and gRPC front ends."""

    def __init__(self, cap: int, on_refuse: Callable[[], None] | None = None):
        """on_refuse(): called on each refusal (the metrics' rejection counter)."""
        self.cap = cap
        self.on_refuse = on_refuse
        self._held: Counter[str] = Counter()

    def in_flight(self, client: str) -> int:
        return self._held[client]

    def clients(self) -> int:
        """Clients holding at least one slot."""
        return len(self._held)

    def try_acquire(self, client: str) -> bool:
        if self.cap and self._held[client] >= self.cap:
            if self.on_refuse is not None:
                self.on_refuse()
            return False
        self._held[client] += 1
        return True

    def release(self, client: str) -> None:
        self._held[client] -= 1
        if self._held[client] <= 0:
            del self._held[client]

    def refusal(self) -> str:
        return f"this client already has {self.cap} requests in flight (the per-client limit)"


async def build_off_loop(factory: RequestFactory, raw: RawRequest) -> GenerationRequest:
    """factory.build(raw), a long prompt tokenized in a thread; one that cannot fit the
    context is refused by its length first (InvalidRequest, nothing tokenized)."""
    try:
        check_prompt_size(factory.max_context, raw.prompt, raw.messages, raw.prompt_token_ids)
    except PromptError as e:
        raise InvalidRequest(e.field, str(e).split(": ", 1)[1]) from e
    if prompt_chars(raw.prompt, raw.messages) < OFF_LOOP_CHARS:
        return factory.build(raw)
    return await asyncio.to_thread(factory.build, raw)
