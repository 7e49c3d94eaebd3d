"""The decode side of a handoff: reserve, fetch, verify, then commit or fail.

1. Reserve: blocks for the handle's tokens in the local pool, under the
   request id (refused with DuplicateRequest if the id holds KV here already:
   that KV and the handle belong to another request and are left alone).
2. Fetch: the transport fills them, within ``timeout_s``.
3. Verify: the bytes moved cover every layer of every block exactly.
4. Commit: the reservation stays under the request id for the engine's DECODE
   submit to adopt. Fail: the reservation is freed here, and the caller
   prefills locally instead.
5. Either way the owner is told to release its blocks (CONSUMED on success,
   FAILED otherwise) in the background; if it cannot be reached, its Redis
   record is marked FAILED and deleted here (it frees its blocks by lease).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from disagg.engine.api import Engine
from disagg.metastore.store import MetaStore
from disagg.transfer.errors import DuplicateRequest, OwnerUnreachable, TransferError
from disagg.transfer.handle import Handle
from disagg.transfer.mirror import Background, RedisMirror
from disagg.transfer.state import HandoffState
from disagg.transfer.transport import Transport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FetchResult:
    ok: bool  # True: the KV is reserved under the request id, ready for a DECODE submit
    reason: str = ""  # why not, when not ok
    bytes: int = 0  # K + V bytes moved
    elapsed_ms: float = 0.0  # reserve to verdict


class KvReceiver:
    def __init__(
        self,
        engine: Engine,
        transport: Transport,
        store: MetaStore | None = None,
        timeout_s: float = 10.0,
    ):
        self._engine = engine
        self._transport = transport
        self._timeout_s = timeout_s
        self._mirror = RedisMirror(store)
        self._releases = Background()

    async def receive(self, request_id: str, handle: Handle) -> FetchResult:
        """Imports the handle's KV under request_id; never raises a TransferError.

        Raises DuplicateRequest (nothing reserved, the handle not released), and
        lets cancellation through after freeing the reservation and releasing."""
        start = time.monotonic()
        ours, consumed = True, False
        try:
            nbytes = await self._import(request_id, handle)
            consumed = True
        except DuplicateRequest:
            ours = False
            raise
        except TransferError as e:
            return FetchResult(ok=False, reason=str(e), elapsed_ms=_ms_since(start))
        finally:
            if ours:
                self._releases.spawn(self._release(handle, consumed))
        return FetchResult(ok=True, bytes=nbytes, elapsed_ms=_ms_since(start))

    async def settle(self) -> None:
        """Waits for the background releases issued so far (tests, shutdown)."""
        await self._releases.settle()
        await self._mirror.background.settle()

    async def _import(self, request_id: str, handle: Handle) -> int:
        dst = self._reserve(request_id, handle)
        try:
            async with asyncio.timeout(self._timeout_s):
                nbytes = await self._transport.fetch(handle, dst, self._engine)
            self._verify(handle, nbytes)
        except BaseException as e:
            self._engine.release(request_id)  # fail: the reservation is freed here, once
            if isinstance(e, TimeoutError):
                raise TransferError(
                    f"KV fetch from {handle.owner_address} exceeded {self._timeout_s}s"
                ) from e
            raise
        return nbytes

    def _reserve(self, request_id: str, handle: Handle) -> list[int]:
        layout = self._engine.info.layout
        if handle.layout != layout:
            raise TransferError(f"KV layout {handle.layout} differs from this worker's {layout}")
        try:
            blocks = self._engine.reserve_import(request_id, handle.num_tokens)
        except ValueError as e:  # the id is running or holds KV here
            raise DuplicateRequest(str(e)) from e
        if blocks is None:
            raise TransferError("no free KV blocks for the import")
        if len(blocks) != len(handle.block_ids):
            self._engine.release(request_id)
            raise TransferError(
                f"handle has {len(handle.block_ids)} blocks for {handle.num_tokens} tokens, "
                f"expected {len(blocks)}"
            )
        return blocks

    @staticmethod
    def _verify(handle: Handle, nbytes: int) -> None:
        """Whatever the transport, every layer of every block must have arrived."""
        layout = handle.layout
        want = 2 * layout.bytes_per_block_per_layer * layout.num_layers * len(handle.block_ids)
        if nbytes != want:
            raise TransferError(f"KV fetch moved {nbytes} bytes, expected {want}")

    async def _release(self, handle: Handle, consumed: bool) -> None:
        try:
            await self._transport.release(handle, consumed)
        except OwnerUnreachable as e:
            log.warning("%s", e)
            self._mirror.drop(handle.request_id, HandoffState.FAILED)


def _ms_since(start: float) -> float:
    return (time.monotonic() - start) * 1000
