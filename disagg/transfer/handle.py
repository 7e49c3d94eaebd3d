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
class Handle:
    request_id: str  # the request whose prompt KV this is, on its owner
    owner_worker_id: str
    owner_address: str  # host:port of the owner's PrefillWorker service
    block_ids: tuple[int, ...]  # the owner's block ids, in prompt order
    num_tokens: int  # prompt tokens whose KV the blocks hold
    layout: KvLayout
    first_token_id: int  # sampled by the prefill worker
    lease_expires_unix_ms: int = 0  # wall clock; the owner frees the blocks then


def handle_to_pb(handle: Handle, state: HandoffState) -> common_pb2.KvHandle:
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
    )


def handle_from_pb(pb: common_pb2.KvHandle) -> Handle:
    """The record's state is dropped: a receiver asks the owner, not the record."""
    return Handle(
        request_id=pb.request_id,
        owner_worker_id=pb.owner_worker_id,
        owner_address=pb.owner_address,
        block_ids=tuple(pb.block_ids),
        num_tokens=pb.num_tokens,
        layout=layout_from_pb(pb.layout),
        first_token_id=pb.first_token_id,
        lease_expires_unix_ms=pb.lease_expires_unix_ms,
    )
