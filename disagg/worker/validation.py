"""Worker-side checks of a prompt against the loaded model (gRPC INVALID_ARGUMENT)."""

from __future__ import annotations

from typing import Protocol

import grpc

from disagg.engine.api import Engine

MAX_CACHE_SALT_BYTES = 64  # a request's cache_salt (the scheduler sends 16)


class Aborter(Protocol):
    """What the checks need of a call: a grpc.aio.ServicerContext, or one request of
    a session (services.decode.session), which ends that request alone."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None: ...


async def validate_prompt(engine: Engine, ids: list[int], context: Aborter) -> None:
    info = engine.info
    if not ids:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids: empty")
    if len(ids) >= info.max_context:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"prompt_token_ids: {len(ids)} tokens, context is {info.max_context}",
        )
    bad = next((t for t in ids if not 0 <= t < info.vocab_size), None)
    if bad is not None:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"prompt_token_ids: token id {bad} outside [0, {info.vocab_size})",
        )
