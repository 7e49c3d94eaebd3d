"""The gRPC transport: KV as protobuf chunks over the workers' own gRPC link.

The fallback that runs anywhere. Both ends are here:
- receiver side (``GrpcTransport.fetch``): ``PrefillWorker/PullKv`` on the
  owner, each ``KvChunk`` checked (``chunks.ChunkTracker``) and written into
  the reserved blocks; ``release`` is ``PrefillWorker/ReleaseKv``;
- owner side (``serve``): the sender's chunk stream as ``KvChunk`` messages,
  for the prefill servicer's ``PullKv`` to yield.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable

import grpc

from disagg.engine.api import Engine
from disagg.engine.threads import serial
from disagg.transfer import verify
from disagg.transfer.chunks import Chunk, write_chunks
from disagg.transfer.errors import OwnerUnreachable, TransferError
from disagg.transfer.handle import Handle
from disagg.transfer.progress import Follower, completed
from disagg.transfer.sender import KvSender
from disagg.v1 import worker_pb2, worker_pb2_grpc

_RELEASE_TIMEOUT_S = 5.0


def chunk_to_pb(chunk: Chunk) -> worker_pb2.KvChunk:
    return worker_pb2.KvChunk(
        layer=chunk.layer,
        first_block=chunk.first_block,
        num_blocks=chunk.num_blocks,
        k=chunk.k,
        v=chunk.v,
    )


def chunk_from_pb(pb: worker_pb2.KvChunk) -> Chunk:
    return Chunk(pb.layer, pb.first_block, pb.num_blocks, pb.k, pb.v)


async def serve(
    sender: KvSender, request_id: str, max_chunk_bytes: int = 0
) -> AsyncGenerator[worker_pb2.KvChunk, None]:
    """The owner's half: ``KvSender.serve`` on the wire (its errors pass through)."""
    async for chunk in sender.serve(request_id, max_chunk_bytes):
        yield chunk_to_pb(chunk)


class GrpcTransport:
    """The receiver's half, a ``transfer.Transport``."""

    name = "grpc"
    reads_without_owner = False  # the owner reads each chunk while it still holds the blocks

    def __init__(self, channel_for: Callable[[str], grpc.aio.Channel], max_chunk_bytes: int = 0):
        """channel_for(address) -> a channel (reused); max_chunk_bytes 0: the owner's default."""
        self._channel_for = channel_for
        self._max_chunk_bytes = max_chunk_bytes

    async def fetch(self, handle: Handle, dst_blocks: list[int], engine: Engine) -> int:
        request = worker_pb2.PullKvRequest(
            request_id=handle.request_id, max_chunk_bytes=self._max_chunk_bytes
        )
        call = self._stub(handle).PullKv(request)
        try:
            chunks = (chunk_from_pb(pb) async for pb in call)
            return await write_chunks(chunks, handle.layout, dst_blocks, engine)
        except grpc.aio.AioRpcError as e:
            raise TransferError(
                f"PullKv from {handle.owner_address}: {e.code().name} {e.details()}"
            ) from e
        finally:
            call.cancel()  # a no-op once the stream is done; ends it on any early exit

    async def follow(
        self, handle: Handle, dst_blocks: list[int], engine: Engine, on_done: Callable[[], None]
    ) -> tuple[int, Handle]:
        """A PREFILLING handle: waits for the owner's done (WatchKv), then pulls it all as
        ``fetch`` and checks it finite. Returns the bytes moved and the completed handle."""
        request = worker_pb2.WatchKvRequest(request_id=handle.request_id)
        follower = Follower(
            self._stub(handle).WatchKv(request), engine.info.layout, handle.num_tokens
        )
        try:
            await follower.start()
            p = await follower.next()
            while not p.done:
                p = await follower.next()
        finally:
            follower.close()
        on_done()
        final = completed(handle, p)
        nbytes = await self.fetch(final, dst_blocks, engine)
        await asyncio.to_thread(serial(verify.check_finite), engine, dst_blocks)
        return nbytes, final

    async def release(self, handle: Handle, consumed: bool) -> bool:
        return await release_kv(self._stub(handle), handle, consumed)

    def _stub(self, handle: Handle) -> worker_pb2_grpc.PrefillWorkerStub:
        return worker_pb2_grpc.PrefillWorkerStub(self._channel_for(handle.owner_address))


async def release_kv(
    stub: worker_pb2_grpc.PrefillWorkerStub, handle: Handle, consumed: bool
) -> bool:
    """``PrefillWorker/ReleaseKv``: every transport ends a pull with it."""
    request = worker_pb2.ReleaseKvRequest(request_id=handle.request_id, consumed=consumed)
    try:
        resp = await stub.ReleaseKv(request, timeout=_RELEASE_TIMEOUT_S)
    except grpc.aio.AioRpcError as e:
        raise OwnerUnreachable(
            f"ReleaseKv to {handle.owner_address} failed: {e.code().name}"
        ) from e
    return bool(resp.released)
