"""A generate() call's keyword options, and the GenerateRequest built from them.

The options mirror ``disagg.v1.GenerateRequest`` (protos/disagg/v1/scheduler.proto
documents each: units, defaults, limits) plus ``timeout``; an option left out
is left unset, so the server's default applies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

from disagg.v1 import scheduler_pb2


class GenerateOptions(TypedDict, total=False):
    """generate() keywords; None (or leaving one out) leaves the field unset: the server's default."""

    messages: Sequence[Mapping[str, str]] | None  # chat turns: {"role": ..., "content": ...}
    prompt_token_ids: Sequence[int] | None
    max_tokens: int | None
    temperature: float | None  # server default 1.0; 0 = greedy
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: Sequence[str] | None
    ignore_eos: bool | None
    request_id: str | None
    prefill_worker: str | None  # debug pinning (worker id or host:port)
    decode_worker: str | None
    ttft_slo_ms: float | None
    itl_slo_ms: float | None
    verify: bool | None  # the server re-runs it collocated and compares (greedy only)
    timeout: float | None  # seconds for the whole call, retries included; None = the client's


_SCALARS = (
    "max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos", "request_id",
    "prefill_worker", "decode_worker", "ttft_slo_ms", "itl_slo_ms", "verify",
)  # fmt: skip
_KNOWN = frozenset({*_SCALARS, "messages", "prompt_token_ids", "stop", "timeout"})


def build_request(prompt: str | None, options: Mapping[str, Any]) -> scheduler_pb2.GenerateRequest:
    """The request for generate(prompt, **options); TypeError on an unknown option."""
    unknown = set(options) - _KNOWN
    if unknown:
        raise TypeError(f"unknown generate() option(s): {', '.join(sorted(unknown))}")
    req = scheduler_pb2.GenerateRequest(prompt=prompt or "")
    for name in _SCALARS:
        if options.get(name) is not None:
            setattr(req, name, options[name])
    for m in options.get("messages") or ():
        req.messages.add(role=m["role"], content=m["content"])
    req.prompt_token_ids.extend(options.get("prompt_token_ids") or ())
    req.stop.extend(options.get("stop") or ())
    return req
