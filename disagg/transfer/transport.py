"""What a transport must do: move one handle's KV into reserved blocks, and release it.

One class per mechanism: ``grpc_transport.GrpcTransport`` (protobuf chunks over
the workers' gRPC link, runs anywhere) today, NIXL (the decode worker READs the
blocks straight out of the owner's registered pool) next. The receiver owns the
reservation, the deadline and the verdict; a transport only moves bytes, so it
must not assume they pass through Python, and never frees blocks itself.

The owner's side of a transport is the sender: ``KvSender.begin`` /
``transferring`` / ``release`` for any transport, plus ``KvSender.serve`` (a
chunk stream read from the engine) for transports whose bytes pass through the
owner's process.
"""

from __future__ import annotations

from typing import Protocol

from disagg.engine.api import Engine
from disagg.transfer.handle import Handle


class Transport(Protocol):
    async def fetch(self, handle: Handle, dst_blocks: list[int], engine: Engine) -> int:
        """Fills dst_blocks (one per handle block, same order) with every layer of the
        handle's KV; returns the bytes moved (K + V, all layers).

        Raises TransferError on anything short of complete, well-formed coverage.
        The receiver cancels it at its deadline: it must clean up on CancelledError.
        Must not free or keep dst_blocks."""
        ...

    async def release(self, handle: Handle, consumed: bool) -> None:
        """Tells the owner to free the handle's blocks (CONSUMED if consumed, else FAILED).

        Raises OwnerUnreachable when the owner cannot be told."""
        ...
