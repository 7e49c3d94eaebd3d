"""A handle: where one request's prefilled KV lives and what it covers.

The address of a handoff, immutable once published. Its state is not part of
it: the owner's lease table decides that, and Redis mirrors it, so the wire
record (``common_pb2.KvHandle``) gets the state at conversion time.
"""

from __future__ import annotations

from dataclasses import dataclass

from disagg.engine.api import KvLayout
from disagg.transfer.state import HandoffState, state_to_pb
from disagg.v1 import common_pb2
from disagg.wire import layout_from_pb, layout_to_pb


@dataclass(frozen=True)
class NixlPool:
    """Where an owner's KV pool lies for NIXL READs (``common_pb2.NixlPool``).

    Per layer, K and V are each one registered region of ``num_blocks`` blocks;
    block i of layer l's K is ``block_bytes`` bytes at ``k_addrs[l] + i * block_bytes``."""

    agent_name: str  # the owner's NIXL agent, unique per worker process
    mem_type: str  # "DRAM" | "VRAM"
    device_id: int  # CUDA device of VRAM; 0 for DRAM
    k_addrs: tuple[int, ...]  # per layer
    v_addrs: tuple[int, ...]
    block_bytes: int
    num_blocks: int


@dataclass(frozen=True)
class Handle:
    request_id: str  # the request whose prompt KV this is, on its owner
    owner_worker_id: str
    owner_address: str  # host:port of the owner's PrefillWorker service
    block_ids: tuple[int, ...]  # the owner's block ids, in prompt order
    num_tokens: int  # prompt tokens whose KV the blocks hold
    layout: KvLayout
    first_token_id: int  # sampled by the prefill worker
    lease_expires_unix_ms: int = 0  # wall clock; the owner frees the blocks then
    nixl: NixlPool | None = None  # set when the owner serves NIXL READs too
    # PREFILLING (layer-wise): the KV is still being computed; no block_ids or
    # first_token_id yet -- the reader follows it with WatchKv (transfer.progress).
    streaming: bool = False


def nixl_pool_to_pb(pool: NixlPool) -> common_pb2.NixlPool:
    return common_pb2.NixlPool(
        agent_name=pool.agent_name,
        mem_type=pool.mem_type,
        device_id=pool.device_id,
        k_addrs=pool.k_addrs,
        v_addrs=pool.v_addrs,
        block_bytes=pool.block_bytes,
        num_blocks=pool.num_blocks,
    )


def nixl_pool_from_pb(pb: common_pb2.NixlPool) -> NixlPool:
    return NixlPool(
        agent_name=pb.agent_name,
        mem_type=pb.mem_type,
        device_id=pb.device_id,
        k_addrs=tuple(pb.k_addrs),
        v_addrs=tuple(pb.v_addrs),
        block_bytes=pb.block_bytes,
        num_blocks=pb.num_blocks,
    )


def handle_to_pb(handle: Handle, state: HandoffState) -> common_pb2.KvHandle:
    """A streaming handle goes out PREFILLING, whatever ``state`` says."""
    if handle.streaming:
        state = HandoffState.PREFILLING
    return common_pb2.KvHandle(
        request_id=handle.request_id,
        owner_worker_id=handle.owner_worker_id,
        owner_address=handle.owner_address,
        block_ids=handle.block_ids,
        num_tokens=handle.num_tokens,
        layout=layout_to_pb(handle.layout),
        state=state_to_pb(state),
        lease_expires_unix_ms=handle.lease_expires_unix_ms,
        first_token_id=handle.first_token_id,
        nixl=nixl_pool_to_pb(handle.nixl) if handle.nixl is not None else None,
    )


def handle_from_pb(pb: common_pb2.KvHandle) -> Handle:
    """The record's state is dropped (a receiver asks the owner, not the record), but for
    PREFILLING: a streaming handle."""
    return Handle(
        request_id=pb.request_id,
        owner_worker_id=pb.owner_worker_id,
        owner_address=pb.owner_address,
        block_ids=tuple(pb.block_ids),
        num_tokens=pb.num_tokens,
        layout=layout_from_pb(pb.layout),
        first_token_id=pb.first_token_id,
        lease_expires_unix_ms=pb.lease_expires_unix_ms,
        nixl=nixl_pool_from_pb(pb.nixl) if pb.HasField("nixl") else None,
        streaming=pb.state == common_pb2.KV_STATE_PREFILLING,
    )
