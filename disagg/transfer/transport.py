"""What a transport must do: move one handle's KV into reserved blocks, and release it.

One class per mechanism: ``grpc_transport.GrpcTransport`` (protobuf chunks over
the workers' gRPC link, runs anywhere) and ``nixl_transport.NixlTransport`` (the
decode worker READs the blocks straight out of the owner's registered pool into
its reserved ones). The receiver owns the reservation, the deadline and the
verdict; a transport only moves bytes, so it must not assume they pass through
Python, and never frees blocks itself. ``TransportChoice`` picks one per handle.

The owner's side of a transport is the sender: ``KvSender.begin`` /
``transferring`` / ``release`` for any transport, plus ``KvSender.serve`` (a
chunk stream read from the engine) for transports whose bytes pass through the
owner's process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from disagg.engine.api import Engine
from disagg.transfer.errors import TransferError
from disagg.transfer.handle import Handle

log = logging.getLogger(__name__)

# The kv_transport a decode worker reports for a handoff that failed (it prefilled the
# prompt itself); a transport's name otherwise.
FALLBACK = "fallback"


class Transport(Protocol):
    name: str  # "grpc", "nixl": the metrics label and the log's word for it
    # True when the owner takes no part in moving the bytes (a NIXL READ): they are
    # then valid only if the owner still held its blocks when the read ended, which
    # only its answer to release(consumed=True) tells; the receiver asks before commit.
    reads_without_owner: bool

    async def fetch(self, handle: Handle, dst_blocks: list[int], engine: Engine) -> int:
        """Fills dst_blocks (one per handle block, same order) with every layer of the
        handle's KV; returns the bytes moved (K + V, all layers).

        Raises TransferError on anything short of complete, well-formed coverage.
        The receiver cancels it at its deadline: it must clean up on CancelledError,
        and return or raise only once nothing more will be written into dst_blocks
        (they go back to the pool right after). Must not free or keep dst_blocks."""
        ...

    async def follow(
        self, handle: Handle, dst_blocks: list[int], engine: Engine, on_done: Callable[[], None]
    ) -> tuple[int, Handle]:
        """``fetch`` of a PREFILLING handle (layer-wise): follows the owner's progress
        (WatchKv) while the prompt runs, calls on_done() once the owner says it is done
        (the prefill finished: where a whole-prompt fetch would begin), and returns the bytes moved and the completed handle (its blocks and
        first token). Also checks every imported value finite (as ``verify``), since
        it may do so as the KV lands. Same cleanup contract as ``fetch``."""
        ...

    async def release(self, handle: Handle, consumed: bool) -> bool:
        """Tells the owner to free the handle's blocks (CONSUMED if consumed, else FAILED);
        False when the owner held nothing under the id any more (released or expired).

        Raises OwnerUnreachable when the owner cannot be told."""
        ...


class TransportChoice:
    """Which transport moves one handle's KV, per the worker's ``kv_transport`` setting.

    - ``grpc``: always gRPC chunks;
    - ``nixl``: NIXL only; a handle whose owner offers no NIXL pool fails the
      handoff (TransferError: the caller prefills locally);
    - ``auto``: NIXL when this worker has an agent and the owner offers a pool
      (both ends advertise it), gRPC otherwise.
    The choice is logged once per owner worker."""

    def __init__(self, mode: str, grpc: Transport, nixl: Transport | None):
        if mode == "nixl" and nixl is None:
            raise ValueError("kv_transport nixl needs a NIXL agent on this worker")
        self._mode = mode
        self._grpc = grpc
        self._nixl = nixl if mode != "grpc" else None
        self._logged: set[str] = set()

    def __call__(self, handle: Handle) -> Transport:
        offered = handle.nixl is not None
        if self._nixl is not None and offered:
            chosen, why = self._nixl, "both workers have NIXL"
        elif self._mode == "nixl":
            raise TransferError(f"owner {handle.owner_worker_id} offers no NIXL pool")
        elif self._mode == "grpc":
            chosen, why = self._grpc, "kv_transport grpc"
        else:
            side = "this worker has no NIXL agent" if offered else "the owner offers no NIXL"
            chosen, why = self._grpc, side
        if handle.owner_worker_id not in self._logged:
            self._logged.add(handle.owner_worker_id)
            log.info("kv transport %s from owner=%s (%s)", chosen.name, handle.owner_worker_id, why)
        return chosen
