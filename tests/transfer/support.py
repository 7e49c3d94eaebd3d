"""Helpers of the transfer tests: an in-process transport, prefills, empty-pool checks.

``LocalTransport`` wires a receiver to senders in the same process: the same
chunk stream the gRPC transport carries, without the wire, so the data plane
is tested against engines alone.
"""

from __future__ import annotations

import asyncio
from typing import Any

from disagg.engine.api import Engine, RequestMode
from disagg.engine.testing import OutputCollector, request
from disagg.mock.engine import MockConfig, MockEngine
from disagg.transfer.chunks import write_chunks
from disagg.transfer.errors import OwnerUnreachable
from disagg.transfer.handle import Handle
from disagg.transfer.sender import KvSender

LEASE_S = 30.0
CHUNK_BYTES = 4096
PER_BLOCK_BYTES = MockEngine(MockConfig(num_blocks=1)).info.layout.bytes_per_block_per_layer


class LocalTransport:
    """A Transport to senders of this process, keyed by owner address."""

    name = "local"
    reads_without_owner = False

    def __init__(self, *senders: tuple[str, KvSender], max_chunk_bytes: int = CHUNK_BYTES):
        self.senders = dict(senders)
        self.max_chunk_bytes = max_chunk_bytes
        self.fetched: dict[str, list[int]] = {}  # request id -> destination blocks
        self.released: list[tuple[str, bool]] = []

    async def fetch(self, handle: Handle, dst_blocks: list[int], engine: Engine) -> int:
        self.fetched[handle.request_id] = list(dst_blocks)
        chunks = self._sender(handle).serve(handle.request_id, self.max_chunk_bytes)
        return await write_chunks(chunks, handle.layout, dst_blocks, engine)

    async def release(self, handle: Handle, consumed: bool) -> bool:
        self.released.append((handle.request_id, consumed))
        return self._sender(handle).release(handle.request_id, consumed)

    def _sender(self, handle: Handle) -> KvSender:
        sender = self.senders.get(handle.owner_address)
        if sender is None:
            raise OwnerUnreachable(f"no sender at {handle.owner_address}")
        return sender


def mock_engine(num_blocks: int = 64) -> MockEngine:
    """A started MockEngine with a small pool and no cost-model sleeps to speak of."""
    cfg = MockConfig(num_blocks=num_blocks, prefill_base_ms=0.1, step_base_ms=0.1)
    eng = MockEngine(cfg)
    eng.start()
    return eng


def sender_for(engine: Engine, address: str = "owner:1", **kw: Any) -> KvSender:
    args: dict[str, Any] = {"lease_s": LEASE_S, "max_chunk_bytes": CHUNK_BYTES, **kw}
    store = args.pop("store", None)
    return KvSender(engine, store, worker_id=f"w-{address}", address=address, **args)


def prefill(engine: Engine, rid: str, prompt: list[int]) -> int:
    """Runs a PREFILL_ONLY request to completion; returns its first token (KV held)."""
    sink = OutputCollector()
    engine.submit(request(prompt, sink, rid=rid, mode=RequestMode.PREFILL_ONLY, max_tokens=8))
    sink.wait([rid])
    (out,) = sink.outputs[rid]
    assert out.finish is not None and out.finish.value == "prefilled", out
    return int(out.token_ids[0])


def decode(engine: Engine, rid: str, prompt: list[int], first: int, n: int) -> list[int]:
    """Continues from imported KV (DECODE): the engine adopts the reservation."""
    sink = OutputCollector()
    engine.submit(
        request(prompt, sink, rid=rid, mode=RequestMode.DECODE, first_token_id=first, max_tokens=n)
    )
    sink.wait([rid])
    assert sink.finish(rid).value == "length", sink.outputs[rid]
    return [first, *sink.tokens(rid)]


def generate(engine: Engine, rid: str, prompt: list[int], n: int) -> list[int]:
    sink = OutputCollector()
    engine.submit(request(prompt, sink, rid=rid, max_tokens=n))
    sink.wait([rid])
    return sink.tokens(rid)


def assert_empty(engine: Engine) -> None:
    """No block allocated, held or reserved; no request left."""
    s = engine.stats()
    assert s.free_blocks == s.total_blocks, f"leaked {s.total_blocks - s.free_blocks} blocks"
    assert s.held == 0 and s.running == 0 and s.waiting == 0


async def eventually(check: Any, timeout_s: float = 5.0) -> None:
    """Polls check() on the running loop until it is true."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)
