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
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator

from disagg.engine.api import Engine
from disagg.metastore.store import MetaStore
from disagg.transfer.chunks import Chunk, plan_chunks
from disagg.transfer.errors import HandoffNotFound, TransferAborted, TransferError
from disagg.transfer.handle import Handle, NixlPool
from disagg.transfer.leases import LeaseTable
from disagg.transfer.mirror import RedisMirror
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
        return handle

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
        """Frees the blocks as CONSUMED or FAILED; False when nothing was held."""
        return self._leases.finish(request_id, consumed)

    def close(self) -> None:
        """Frees every held handoff as FAILED (the worker is going away)."""
        self._leases.close()
        self._mirror.close()

    async def settle(self) -> None:
        """Waits for the background Redis writes issued so far (tests, shutdown)."""
        await self._mirror.background.settle()

    def _free(self, request_id: str, outcome: HandoffState) -> None:
        self._engine.release(request_id)
        self.freed[outcome] += 1
        if outcome is HandoffState.EXPIRED:
            log.warning("kv lease expired request_id=%s", request_id)
        self._mirror.drop(request_id, outcome)
