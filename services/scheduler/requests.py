"""Front-end-neutral request values and their validation.

Both front ends (gRPC here, HTTP next to it) turn their wire input into a
``GenerationRequest`` through ``build_request``; errors are ``InvalidRequest``
naming the field, answered as INVALID_ARGUMENT / HTTP 400.

Every request gets a fresh internal id here (``request_id``): the only key it
has inside the cluster. The client's own id is checked (length, charset) and
kept apart, only to be echoed back (``reply_id``); two clients sending the
same id share nothing (docs/adr/0008).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from disagg.engine.api import MAX_TOP_K, MIN_TEMPERATURE, SamplingParams
from disagg.runtime.ids import client_id_error, new_request_id
from disagg.tokenization.prompts import ChatTurn, PromptError, render_prompt

MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 256
MAX_TEMPERATURE = 100.0


class InvalidRequest(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class Unavailable(RuntimeError):
    """No worker can serve the request now (gRPC UNAVAILABLE / HTTP 503)."""


class Overloaded(RuntimeError):
    """Admission refused (gRPC RESOURCE_EXHAUSTED / HTTP 429)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str  # internal: the scheduler made it; the key in workers, Redis and logs
    prompt_token_ids: list[int]
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    prefill_pin: str = ""
    decode_pin: str = ""
    ttft_slo_ms: float = 0.0  # 0 = the server's default SLO
    itl_slo_ms: float = 0.0  # 0 = the server's default SLO
    verify: bool = False  # re-run collocated after the stream and compare (greedy only)
    client_request_id: str = ""  # the client's own id: echoed, never a key; "" = none sent
    cache_salt: bytes = b""  # the tenant's prefix-cache salt (auth.cache_salt); b"" = none

    @property
    def reply_id(self) -> str:
        """The id the responses carry: the client's, else the internal one."""
        return self.client_request_id or self.request_id


@dataclass
class Timing:
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    kv_transfer_ms: float = 0.0
    decode_ms: float = 0.0
    ttft_ms: float = 0.0
    e2e_ms: float = 0.0
    kv_transport: str = ""  # nixl | grpc | fallback; "" = no handoff


@dataclass
class GenerationEvent:
    """New tokens/text; the last event has ``finish_reason`` and the totals."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    timing: Timing = field(default_factory=Timing)
    prefill_worker: str = ""
    decode_worker: str = ""
    error: str = ""


@dataclass(frozen=True)
class RawRequest:
    """A request as the front ends parsed it, before any checks (None = unset)."""

    request_id: str = ""  # the client's id (echoed only)
    prompt: str = ""
    messages: Sequence[ChatTurn] = ()
    prompt_token_ids: Sequence[int] = ()
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    prefill_pin: str = ""
    decode_pin: str = ""
    ttft_slo_ms: float | None = None
    itl_slo_ms: float | None = None
    verify: bool = False


@dataclass(frozen=True)
class RequestFactory:
    """One model's limits and tokenizer: what every front end needs to build requests."""

    tokenizer: Any
    vocab_size: int
    max_context: int
    default_max_tokens: int  # max_tokens when a request sets none

    def build(self, raw: RawRequest) -> GenerationRequest:
        """Raises InvalidRequest naming the field at fault."""
        return build_request(
            raw, self.tokenizer, self.vocab_size, self.max_context, self.default_max_tokens
        )


def build_request(
    raw: RawRequest, tokenizer: Any, vocab_size: int, max_context: int, default_max_tokens: int
) -> GenerationRequest:
    why = client_id_error(raw.request_id)
    if why is not None:
        raise InvalidRequest("request_id", why)
    try:
        ids = render_prompt(tokenizer, vocab_size, raw.prompt, raw.messages, raw.prompt_token_ids)
    except PromptError as e:
        raise InvalidRequest(e.field, str(e).split(": ", 1)[1]) from e
    if len(ids) >= max_context:
        raise InvalidRequest(
            "prompt",
            f"prompt is {len(ids)} tokens; the model's context is {max_context} (it must leave room for one new token)",
        )
    room = max_context - len(ids)
    if raw.max_tokens is None:
        max_tokens = min(default_max_tokens, room)
    elif raw.max_tokens <= 0:
        raise InvalidRequest("max_tokens", f"must be > 0, got {raw.max_tokens}")
    elif raw.max_tokens > room:
        raise InvalidRequest(
            "max_tokens",
            f"prompt ({len(ids)} tokens) + max_tokens ({raw.max_tokens}) exceeds the model's context of {max_context}",
        )
    else:
        max_tokens = raw.max_tokens
    sampling = _sampling(raw, max_tokens)
    if raw.verify and sampling.temperature != 0:
        raise InvalidRequest("verify", "only greedy requests can be verified: set temperature to 0")
    return GenerationRequest(
        request_id=new_request_id(),
        prompt_token_ids=ids,
        sampling=sampling,
        stop=_stops(raw.stop),
        prefill_pin=raw.prefill_pin,
        decode_pin=raw.decode_pin,
        ttft_slo_ms=_slo("ttft_slo_ms", raw.ttft_slo_ms),
        itl_slo_ms=_slo("itl_slo_ms", raw.itl_slo_ms),
        verify=raw.verify,
        client_request_id=raw.request_id,
    )


def _slo(name: str, value: float | None) -> float:
    if value is None:
        return 0.0
    if not math.isfinite(value) or value <= 0:
        raise InvalidRequest(name, f"must be > 0 milliseconds, got {value}")
    return float(value)


def _sampling(raw: RawRequest, max_tokens: int) -> SamplingParams:
    temperature = _temperature(raw.temperature)
    top_p = 1.0 if raw.top_p is None else _finite(raw.top_p)
    top_k = 0 if raw.top_k is None else raw.top_k
    if not 0 < top_p <= 1:
        raise InvalidRequest("top_p", f"must be in (0, 1], got {top_p}")
    if not 0 <= top_k <= MAX_TOP_K:
        raise InvalidRequest("top_k", f"must be in [0, {MAX_TOP_K}] (0 disables it), got {top_k}")
    if raw.seed is not None and not -(2**63) <= raw.seed < 2**63:
        raise InvalidRequest("seed", "must fit in a signed 64-bit integer")
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=raw.seed,
            ignore_eos=raw.ignore_eos,
        )
    except ValueError as e:  # the engine's own check: a bound this file missed is still a 400
        raise InvalidRequest("sampling", str(e)) from e


def _temperature(value: float | None) -> float:
    """The temperature to sample at: finite, in [0, MAX_TEMPERATURE]; below
    MIN_TEMPERATURE it is 0 (greedy), as the sampler would treat it anyway, so
    the wire and ``verify`` see what is actually done."""
    if value is None:
        return 1.0
    t = _finite(value)
    if not 0 <= t <= MAX_TEMPERATURE:
        raise InvalidRequest("temperature", f"must be in [0, {MAX_TEMPERATURE:g}], got {value}")
    return 0.0 if t < MIN_TEMPERATURE else t


def _finite(value: float) -> float:
    """value as a finite float (NaN, inf and ints too large for a float become NaN)."""
    try:
        f = float(value)
    except OverflowError:
        return math.nan
    return f if math.isfinite(f) else math.nan


def _stops(stop: Sequence[str]) -> tuple[str, ...]:
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidRequest("stop", f"at most {MAX_STOP_STRINGS} stop strings")
    for s in stop:
        if not s:
            raise InvalidRequest("stop", "stop strings must be non-empty")
        if len(s) > MAX_STOP_LEN:
            raise InvalidRequest("stop", f"stop strings must be at most {MAX_STOP_LEN} characters")
    return tuple(stop)
