"""The decode side of a handoff: reserve, fetch, verify, then commit or fail.

0. Trust the owner (``owners.RegisteredOwners``): a handle whose owner is not a
   registered prefill worker fails at once (ForeignOwner), before anything is
   reserved and without contacting that owner -- not even to release.
1. Reserve: blocks for the handle's tokens in the local pool, under the
   request id (refused with DuplicateRequest if the id holds KV here already:
   that KV and the handle belong to another request and are left alone).
2. Fetch: the transport chosen for the handle (``TransportChoice``) fills
   them, within ``timeout_s``.
3. Verify (``verify.py``; imported KV is untrusted): the bytes moved cover
   every layer of every block exactly, and every value is finite. A transport
   that reads without the owner (NIXL) then has the owner release its blocks
   as CONSUMED and commits only if they were still held (else FAILED: a lease
   that ran out mid-READ may have handed them to another request).
4. Commit: the reservation stays under the request id for the engine's DECODE
   submit to adopt. Fail: the reservation is zeroed and freed here, and the
   caller prefills locally instead.
5. Unless 3 did it, the owner is told to release its blocks (CONSUMED on
   success, FAILED otherwise) in the background; if it cannot be reached, its
   Redis record is marked FAILED and deleted here (it frees its blocks by lease).
A PREFILLING handle (layer-wise) is taken before its prompt has run: 2 is the
transport's ``follow`` (reads as the owner's progress allows), the deadline
counts from the owner's done (before it, at most ``PREFILL_WAIT_S``), and the
result's ``elapsed_ms`` is that tail: prefill finished -> KV verified here,
what a whole-prompt fetch takes from its start.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from disagg.engine.api import Engine
from disagg.engine.threads import serial
from disagg.metastore.store import MetaStore
from disagg.metrics.transfer import TransferMetrics
from disagg.transfer import verify
from disagg.transfer.errors import (
    DuplicateRequest,
    OwnerUnreachable,
    ReadInFlight,
    TransferAborted,
    TransferError,
)
from disagg.transfer.handle import Handle
from disagg.transfer.mirror import Background, RedisMirror
from disagg.transfer.state import HandoffState
from disagg.transfer.transport import Transport

log = logging.getLogger(__name__)

PREFILL_WAIT_S = 600.0  # a PREFILLING handle: the longest wait for its owner's done


@dataclass(frozen=True)
class FetchResult:
    ok: bool  # True: the KV is reserved under the request id, ready for a DECODE submit
    reason: str = ""  # why not, when not ok
    bytes: int = 0  # K + V bytes moved
    elapsed_ms: float = 0.0  # reserve to verdict
    transport: str = ""  # the transport that moved (or failed to move) the KV
    first_token_id: int | None = None  # the owner's first token (for a PREFILLING handle:
    # known only once it was done; None when it never said)


class KvReceiver:
    def __init__(
        self,
        engine: Engine,
        transport: Transport,
        store: MetaStore | None = None,
        timeout_s: float = 10.0,
        *,
        choose: Callable[[Handle], Transport] | None = None,
        metrics: TransferMetrics | None = None,
        check_owner: Callable[[Handle], Awaitable[None]] | None = None,
    ):
        """transport: the one for every handle, unless choose(handle) picks another
        (it may raise TransferError: that handoff fails, released through transport).
        check_owner(handle) raises TransferError for an owner this worker must not
        contact (``RegisteredOwners.check``); None: every owner is contacted."""
        self._engine = engine
        self._check_owner = check_owner
        self._transport = transport
        self._choose = choose or (lambda _handle: transport)
        self._timeout_s = timeout_s
        self._metrics = metrics
        self._mirror = RedisMirror(store)
        self._releases = Background()
        self._fault = os.environ.get("DISAGG_TEST_FAULT_KV", "")  # test-only, see _import

    async def receive(self, request_id: str, handle: Handle) -> FetchResult:
        """Imports the handle's KV under request_id; never raises a TransferError.

        Raises DuplicateRequest (nothing reserved, the handle not released), and
        lets cancellation through after freeing the reservation and releasing."""
        start = time.monotonic()
        refused = await self._refusal(handle)
        first = None if handle.streaming else handle.first_token_id
        if refused is not None:
            no = FetchResult(False, refused, 0, _ms_since(start), "refused", first)
            return self._observe(no)
        transport = self._transport
        must_release, consumed = True, False
        known = _Known(first)
        try:
            transport = self._choose(handle)
            nbytes = await self._import(request_id, handle, transport, known)
            consumed = True
            must_release = not transport.reads_without_owner  # released in _import
        except DuplicateRequest:
            must_release = False
            raise
        except TransferError as e:
            elapsed = _ms_since(known.done_at or start)
            failed = FetchResult(False, str(e), 0, elapsed, transport.name, known.first_token_id)
            return self._observe(failed)
        finally:
            if must_release:
                self._releases.spawn(self._release(transport, handle, consumed))
        elapsed = _ms_since(known.done_at or start)
        ok = FetchResult(True, "", nbytes, elapsed, transport.name, known.first_token_id)
        return self._observe(ok)

    async def _refusal(self, handle: Handle) -> str | None:
        """Why handle's owner must not be contacted at all, or None."""
        if self._check_owner is None:
            return None
        try:
            await self._check_owner(handle)
        except TransferError as e:
            log.warning("kv handle refused request_id=%r: %s", handle.request_id, e)
            return str(e)
        return None

    async def settle(self) -> None:
        """Waits for the background releases issued so far (tests, shutdown)."""
        await self._releases.settle()
        await self._mirror.background.settle()

    def _observe(self, result: FetchResult) -> FetchResult:
        if self._metrics is not None:
            self._metrics.observe(
                result.transport, result.ok, result.elapsed_ms / 1e3, result.bytes
            )
        return result

    async def _import(
        self, request_id: str, handle: Handle, transport: Transport, known: _Known
    ) -> int:
        dst = self._reserve(request_id, handle)
        try:
            async with asyncio.timeout(
                PREFILL_WAIT_S if handle.streaming else self._timeout_s
            ) as t:
                if handle.streaming:

                    def on_done() -> None:  # the transfer deadline counts from here
                        known.done_at = time.monotonic()
                        t.reschedule(asyncio.get_running_loop().time() + self._timeout_s)

                    nbytes, handle = await transport.follow(handle, dst, self._engine, on_done)
                    known.first_token_id = handle.first_token_id
                else:
                    nbytes = await transport.fetch(handle, dst, self._engine)
                if self._fault == "shift_block" and len(dst) > 1:  # test-only: block 0 <- block 1
                    for layer in range(handle.layout.num_layers):  # (tests/clients/test_verify.py)
                        k, v = self._engine.read_kv(dst[1:2], layer)
                        self._engine.write_kv(dst[:1], layer, k, v)
                verify.check_coverage(handle, nbytes)
                if known.done_at is None or self._fault:  # follow() checked what it read
                    await asyncio.to_thread(serial(verify.check_finite), self._engine, dst)
                if transport.reads_without_owner:
                    await self._confirm(transport, handle)
        except ReadInFlight:
            log.error(
                "kv blocks %s stay reserved under %r: a READ into them never ended", dst, request_id
            )
            raise
        except BaseException as e:
            # Fail: zeroed (no unchecked value stays in the pool), then freed here, once.
            verify.wipe(self._engine, dst)
            self._engine.release(request_id)
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
        if not handle.streaming and len(blocks) != len(handle.block_ids):
            self._engine.release(request_id)
            raise TransferError(
                f"handle has {len(handle.block_ids)} blocks for {handle.num_tokens} tokens, "
                f"expected {len(blocks)}"
            )
        return blocks

    @staticmethod
    async def _confirm(transport: Transport, handle: Handle) -> None:
        """The owner releases its blocks as CONSUMED; they must have been held until now."""
        if not await transport.release(handle, True):
            raise TransferAborted(
                f"{handle.owner_address} freed the KV of {handle.request_id!r} before the "
                "read was confirmed (lease expired or released): its bytes cannot be trusted"
            )

    async def _release(self, transport: Transport, handle: Handle, consumed: bool) -> None:
        try:
            await transport.release(handle, consumed)
        except OwnerUnreachable as e:
            log.warning("%s", e)
            self._mirror.drop(handle.request_id, HandoffState.FAILED)


@dataclass
class _Known:
    """What one handoff learnt on the way (a PREFILLING handle's are learnt late)."""

    first_token_id: int | None
    done_at: float | None = None  # monotonic: a PREFILLING handle's done (prefill finished)


def _ms_since(start: float) -> float:
    return (time.monotonic() - start) * 1000
