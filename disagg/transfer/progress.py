"""Layer-wise streaming: a prefill's KV handed off while it is computed.

The prefill worker answers ``PrefillStream`` with a handle in state PREFILLING
before the prompt runs; the decode worker takes it at once and follows the KV
with ``WatchKv``: ``Progress`` messages, each saying how much of the prompt is
in the owner's pool -- tokens [0, computed) in every layer, [computed, upto) in
layers [0, layers) -- as the engine's forward lands each layer of each chunk
(``engine.api.KvProgress``). A block may be read once every token it holds is
in, in that layer; the last, partial block once the KV is complete. So a reader
that keeps up has only the last layer of the last chunk left when the prefill's
forward ends, and the owner's ``done`` (first token, hold) to wait for.

Owner side: ``KvStream`` (one per streamed prefill, in the ``KvSender``) turns
the engine thread's reports into progress on the event loop, for one watcher.
Reader side: ``Follower`` consumes the WatchKv stream in the background and
hands out the latest progress, checked (``check``); ``readable`` says which
blocks of which layer it allows; ``completed`` is the handle at done.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc

from disagg.engine.api import KvLayout, KvProgress
from disagg.transfer.errors import TransferAborted, TransferError
from disagg.transfer.handle import Handle
from disagg.v1 import worker_pb2


@dataclass(frozen=True)
class Progress:
    block_ids: tuple[int, ...]  # the owner's blocks so far, prompt order
    computed: int  # tokens in every layer
    upto: int  # tokens in layers [0, layers)
    layers: int
    done: bool = False  # every block, every layer: the prefill finished
    first_token_id: int = 0  # with done


def progress_to_pb(p: Progress) -> worker_pb2.KvProgress:
    return worker_pb2.KvProgress(
        block_ids=p.block_ids,
        computed=p.computed,
        upto=p.upto,
        layers=p.layers,
        done=p.done,
        first_token_id=p.first_token_id,
    )


def progress_from_pb(pb: worker_pb2.KvProgress) -> Progress:
    return Progress(
        tuple(pb.block_ids), pb.computed, pb.upto, pb.layers, pb.done, pb.first_token_id
    )


def complete(p: Progress, layout: KvLayout, num_tokens: int) -> bool:
    """Every token of the prompt is in every layer: the prefill's last layer landed
    (done -- the first token and the hold -- follows)."""
    return p.done or (p.upto == num_tokens and p.layers == layout.num_layers)


def readable(p: Progress, layout: KvLayout, num_tokens: int) -> list[int]:
    """Per layer: how many leading blocks of the prompt may be read after p (the last,
    partial one once the KV is complete: a PREFILL_ONLY request writes nothing after)."""
    bs = layout.block_size
    if complete(p, layout, num_tokens):
        return [-(-num_tokens // bs)] * layout.num_layers
    return [
        (p.upto if layer < p.layers else p.computed) // bs for layer in range(layout.num_layers)
    ]


def check(p: Progress, prev: Progress | None, layout: KvLayout, num_tokens: int) -> None:
    """What an owner's progress may say: within the prompt and the layers, never taking
    back blocks it named before (a reader may have copied them), complete at done."""
    if not 0 <= p.computed <= p.upto <= num_tokens or not 0 <= p.layers <= layout.num_layers:
        raise TransferError(
            f"KV progress out of range: computed {p.computed} upto {p.upto} layers {p.layers} "
            f"for {num_tokens} tokens, {layout.num_layers} layers"
        )
    blocks = -(-num_tokens // layout.block_size)
    if len(p.block_ids) > blocks or -(-p.upto // layout.block_size) > len(p.block_ids):
        raise TransferError(f"KV progress names {len(p.block_ids)} blocks for {p.upto} tokens")
    if prev is not None and p.block_ids[: len(prev.block_ids)] != prev.block_ids:
        raise TransferError("KV progress changed blocks it had named")
    if p.done and (p.computed != num_tokens or len(p.block_ids) != blocks):
        raise TransferError(f"KV done with {p.computed} of {num_tokens} tokens")


class KvStream:
    """Owner side of one streamed prefill: the engine's progress, for one watcher."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self.latest = Progress((), 0, 0, 0)
        self._changed = asyncio.Event()
        self.error: str | None = None
        self.watched = False
        self.nixl_reader = False  # the watcher READs itself: TRANSFERRING at done
        self.abandoned = False  # given up before done: the KV is freed when the prefill ends

    def on_kv_progress(self, p: KvProgress) -> None:
        """The engine's ``on_kv_progress`` (engine thread): to the loop, in order."""
        self._loop.call_soon_threadsafe(
            self._set, Progress(p.block_ids, p.computed, p.upto, p.layers)
        )

    def _set(self, p: Progress) -> None:
        if not self.latest.done:
            self.latest = p
            self._changed.set()

    def finish(self, block_ids: tuple[int, ...], num_tokens: int, layers: int, first: int) -> None:
        self.latest = Progress(block_ids, num_tokens, num_tokens, layers, True, first)
        self._changed.set()

    def fail(self, why: str) -> None:
        if not self.latest.done:
            self.error = why
            self._changed.set()

    async def follow(self) -> AsyncIterator[Progress]:
        """The progress as it changes (coalesced: the latest when the watcher is ready),
        until done. Raises TransferAborted when the prefill fails."""
        last = None
        while True:
            self._changed.clear()
            if self.error is not None:
                raise TransferAborted(f"the prefill failed: {self.error}")
            p = self.latest
            if p != last:
                last = p
                yield p
                if p.done:
                    return
                continue
            await self._changed.wait()


def completed(handle: Handle, done: Progress) -> Handle:
    """A PREFILLING handle once its KV is complete: its blocks and first token."""
    return dataclasses.replace(
        handle, block_ids=done.block_ids, first_token_id=done.first_token_id, streaming=False
    )


class Follower:
    """Reader side of a WatchKv call: the latest progress, not every message.

    ``start`` waits for the first message (returned as is: a NIXL reader's agent
    metadata rides on it), then the rest are consumed in the background, each
    checked against the last; ``next`` gives the latest not yet given. Every
    failure is a TransferError: the call's status, a progress out of bounds, a
    stream that ends before done."""

    def __init__(self, call: Any, layout: KvLayout, num_tokens: int):
        self._call = call
        self._layout = layout
        self._num_tokens = num_tokens
        self._latest: Progress | None = None
        self._given: Progress | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> worker_pb2.KvProgress:
        messages = self._call.__aiter__()
        try:
            first = await messages.__anext__()
        except StopAsyncIteration:
            raise TransferError("WatchKv ended before any progress") from None
        except grpc.aio.AioRpcError as e:
            raise _error(e) from e
        self._take(first)
        self._task = asyncio.create_task(self._consume(messages))
        return first

    async def next(self) -> Progress:
        while True:
            latest = self._latest
            if latest is not None and latest is not self._given:
                self._given = latest
                return latest
            assert self._task is not None, "start() first"
            if self._task.done():
                e = self._task.exception()
                if isinstance(e, grpc.aio.AioRpcError):
                    raise _error(e) from e
                if e is not None:
                    raise e if isinstance(e, TransferError) else TransferError(str(e))
                raise TransferError("WatchKv ended before the KV was done")
            self._changed.clear()
            waiter = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait({waiter, self._task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._call.cancel()

    async def _consume(self, messages: AsyncIterator[worker_pb2.KvProgress]) -> None:
        async for pb in messages:
            self._take(pb)
            if self._latest is not None and self._latest.done:
                return

    def _take(self, pb: worker_pb2.KvProgress) -> None:
        p = progress_from_pb(pb)
        check(p, self._latest, self._layout, self._num_tokens)
        self._latest = p
        self._changed.set()


def _error(e: grpc.aio.AioRpcError) -> TransferError:
    return TransferError(f"WatchKv: {e.code().name} {e.details()}")
