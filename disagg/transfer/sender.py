"""The prefill side of a handoff: hold, lease, serve, release.

1. ``hold``: after a PREFILL_ONLY request, its held blocks go under a lease
   (READY) and the handle is published to Redis in the background: the
   caller answers at once, whatever state Redis is in (the decode worker gets
   the handle in the request, not from Redis).
2. ``begin`` (or the first step of ``serve``): READY -> TRANSFERRING, one
   receiver only. ``serve`` then reads the blocks from the engine chunk by
   chunk, checking before each read that the pull still owns them; a NIXL
   reader (``StartKvRead``) reads them itself and learns from ``release``
   whether they were still held when it was done.
3. ``release``: CONSUMED or FAILED; or the lease runs out: EXPIRED. Either way
   the engine frees the blocks once, ``freed`` counts the outcome, and Redis
   gets the final state and loses the record, in the background.
The lease table is the truth; Redis mirrors it (``mirror.RedisMirror``).

Streamed (``open_stream``, layer-wise): the handle goes out PREFILLING before the
prompt runs (``stream_handle``), and one watcher (``watch``) follows the KV as
the engine computes it (``progress.KvStream``). At ``hold`` the stream is done:
READY as above, or TRANSFERRING at once for a NIXL watcher. A stream given up
before then (its watcher left or released it) is freed as FAILED at ``hold``;
a prefill that fails ends its stream (``fail_stream``: the watcher is told).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator

from disagg.engine.api import Engine
from disagg.metastore.store import MetaStore
from disagg.transfer.chunks import Chunk, plan_chunks
from disagg.transfer.errors import HandoffNotFound, HandoffTaken, TransferAborted, TransferError
from disagg.transfer.handle import Handle, NixlPool
from disagg.transfer.leases import LeaseTable
from disagg.transfer.mirror import RedisMirror
from disagg.transfer.progress import KvStream
from disagg.transfer.state import HandoffState

log = logging.getLogger(__name__)

_RECORD_GRACE_S = 5.0  # the Redis record outlives the lease by this much


class KvSender:
    def __init__(
        self,
        engine: Engine,
        store: MetaStore | None,
        *,
        worker_id: str,
        address: str,
        lease_s: float,
        max_chunk_bytes: int,
        nixl: NixlPool | None = None,
    ):
        """nixl: this worker's registered pool, put in every handle for NIXL readers."""
        self._engine = engine
        self._nixl = nixl
        self._worker_id = worker_id
        self._address = address
        self._lease_s = lease_s
        self._max_chunk_bytes = max_chunk_bytes
        self._leases = LeaseTable(lease_s, self._free)
        self._mirror = RedisMirror(store)
        self._streams: dict[str, KvStream] = {}  # streamed prefills, until their KV is freed
        self._streamed = False  # logged once: this worker streams KV layer-wise
        self.freed = {
            s: 0 for s in (HandoffState.CONSUMED, HandoffState.FAILED, HandoffState.EXPIRED)
        }

    def __len__(self) -> int:
        """Handoffs whose blocks are still held here."""
        return len(self._leases)

    def holds(self, request_id: str) -> bool:
        """True when the engine holds KV under this id (held here or not yet leased)."""
        return self._engine.held_blocks(request_id) is not None

    async def hold(self, request_id: str, first_token_id: int) -> Handle:
        """Leases the engine's held blocks of a finished prefill and publishes the handle
        in the background. Does not wait on Redis (nor on anything else).

        Raises TransferError when the engine holds nothing under the id."""
        held = self._engine.held_blocks(request_id)
        if held is None:
            self.fail_stream(request_id, "the prefill holds no KV")
            raise TransferError(f"prefill of {request_id!r} finished but holds no KV")
        self._leases.hold(request_id)
        handle = Handle(
            request_id=request_id,
            owner_worker_id=self._worker_id,
            owner_address=self._address,
            block_ids=tuple(held[0]),
            num_tokens=held[1],
            layout=self._engine.info.layout,
            first_token_id=first_token_id,
            lease_expires_unix_ms=int((time.time() + self._lease_s) * 1000),
            nixl=self._nixl,
        )
        self._mirror.put(handle, HandoffState.READY, self._lease_s + _RECORD_GRACE_S)
        stream = self._streams.get(request_id)
        if stream is not None:
            if stream.abandoned:
                self._leases.finish(request_id, False)
                stream.fail("given up by its reader")
                return handle
            if stream.nixl_reader:
                self.begin(request_id)
            layers = handle.layout.num_layers
            stream.finish(handle.block_ids, handle.num_tokens, layers, first_token_id)
        return handle

    def open_stream(self, request_id: str) -> KvStream:
        """A streamed prefill of request_id begins (its handle: ``stream_handle``).

        Raises TransferError when the id holds KV here or streams already."""
        if request_id in self._streams or self.holds(request_id):
            raise TransferError(f"request_id {request_id!r} already holds KV here")
        stream = KvStream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        if not self._streamed:
            self._streamed = True
            log.info("kv streamed layer-wise (first: request_id=%s)", request_id)
        return stream

    def stream_handle(self, request_id: str, num_tokens: int) -> Handle:
        """The PREFILLING handle of an open stream: no blocks, no first token yet."""
        return Handle(
            request_id=request_id,
            owner_worker_id=self._worker_id,
            owner_address=self._address,
            block_ids=(),
            num_tokens=num_tokens,
            layout=self._engine.info.layout,
            first_token_id=0,
            nixl=self._nixl,
            streaming=True,
        )

    def fail_stream(self, request_id: str, why: str) -> None:
        """The streamed prefill failed (its blocks are gone): its watcher is told."""
        stream = self._streams.get(request_id)
        if stream is not None and not stream.latest.done:
            del self._streams[request_id]
            stream.fail(why)

    def watch(self, request_id: str, nixl: bool) -> KvStream:
        """Claims a streamed prefill for its one reader (nixl: one that READs itself).

        Raises HandoffNotFound (no such stream) or HandoffTaken (it has a reader)."""
        stream = self._streams.get(request_id)
        if stream is None or stream.abandoned:
            raise HandoffNotFound(f"no streamed prefill of {request_id!r} here")
        if stream.watched:
            raise HandoffTaken(f"the KV of {request_id!r} already has a reader")
        stream.watched, stream.nixl_reader = True, nixl
        if stream.latest.done and nixl:  # a late watcher: it is READY already
            self.begin(request_id)
        return stream

    def unwatch(self, request_id: str, stream: KvStream) -> None:
        """The watcher left; before done, that gives the KV up (freed when the prefill ends)."""
        if not stream.latest.done:
            stream.abandoned = True

    def begin(self, request_id: str) -> list[int]:
        """READY -> TRANSFERRING; returns the held block ids (the lease is re-armed).

        Raises HandoffNotFound when nothing READY is held under the id."""
        held = self._engine.held_blocks(request_id)
        if held is None or not self._leases.begin_transfer(request_id):
            raise HandoffNotFound(
                f"no KV ready for request {request_id!r} (expired, released or being pulled)"
            )
        self._mirror.set_state(request_id, HandoffState.TRANSFERRING, HandoffState.READY)
        return held[0]

    def transferring(self, request_id: str) -> bool:
        """True while the pull that began may still read the blocks."""
        return self._leases.transferring(request_id)

    async def serve(self, request_id: str, max_chunk_bytes: int = 0) -> AsyncGenerator[Chunk, None]:
        """The request's KV as chunks (layer-major), read from the engine lazily.

        Raises HandoffNotFound before the first chunk (see ``begin``), and
        TransferAborted as soon as the blocks were released or expired mid-pull:
        they may already belong to another request, so they are not read."""
        blocks = self.begin(request_id)
        layout = self._engine.info.layout
        for span in plan_chunks(layout, len(blocks), max_chunk_bytes or self._max_chunk_bytes):
            if not self.transferring(request_id):
                raise TransferAborted(f"KV of {request_id!r} was freed during the pull")
            ids = blocks[span.first_block : span.first_block + span.num_blocks]
            k, v = self._engine.read_kv(ids, span.layer)
            yield Chunk(span.layer, span.first_block, span.num_blocks, k, v)

    def release(self, request_id: str, consumed: bool) -> bool:
        """Frees the blocks as CONSUMED or FAILED; False when nothing was held (a stream
        still prefilling is given up: freed as FAILED when the prefill ends)."""
        stream = self._streams.get(request_id)
        if stream is not None and not stream.latest.done:
            stream.abandoned = True
            return False
        return self._leases.finish(request_id, consumed)

    def close(self) -> None:
        """Frees every held handoff as FAILED (the worker is going away)."""
        for rid in list(self._streams):
            self.fail_stream(rid, "the prefill worker is stopping")
        self._leases.close()
        self._mirror.close()

    async def settle(self) -> None:
        """Waits for the background Redis writes issued so far (tests, shutdown)."""
        await self._mirror.background.settle()

    def _free(self, request_id: str, outcome: HandoffState) -> None:
        self._streams.pop(request_id, None)
        self._engine.release(request_id)
        self.freed[outcome] += 1
        if outcome is HandoffState.EXPIRED:
            log.warning("kv lease expired request_id=%s", request_id)
        self._mirror.drop(request_id, outcome)
