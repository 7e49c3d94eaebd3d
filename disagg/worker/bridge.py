"""Bridges the engine's thread callbacks into asyncio.

``run_request`` submits an EngineRequest and yields its TokenOutputs as an
async iterator. If the consumer stops early (client cancelled, error), the
request is aborted in the engine so its blocks are freed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable

from disagg.engine.api import (
    Engine,
    EngineRequest,
    KvProgress,
    RequestMode,
    SamplingParams,
    TokenOutput,
)


async def run_request(
    engine: Engine,
    request_id: str,
    prompt_token_ids: list[int],
    sampling: SamplingParams,
    mode: RequestMode,
    first_token_id: int | None = None,
    cache_salt: bytes = b"",
    on_kv_progress: Callable[[KvProgress], None] | None = None,
) -> AsyncGenerator[TokenOutput, None]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[TokenOutput] = asyncio.Queue()

    def on_output(out: TokenOutput) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, out)

    engine.submit(
        EngineRequest(
            request_id=request_id,
            prompt_token_ids=prompt_token_ids,
            sampling=sampling,
            on_output=on_output,
            mode=mode,
            first_token_id=first_token_id,
            cache_salt=cache_salt,
            on_kv_progress=on_kv_progress,
        )
    )
    finished = False
    try:
        while not finished:
            out = await queue.get()
            finished = out.finish is not None
            yield out
    finally:
        if not finished:
            engine.abort(request_id)
