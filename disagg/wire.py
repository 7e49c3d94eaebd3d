"""Conversions between protobuf messages (the wire) and the dataclasses inside.

Servicers call these at the boundary; nothing past them sees protobuf.
"""

from __future__ import annotations

from disagg.engine.api import KvLayout, SamplingParams
from disagg.v1 import common_pb2


def layout_to_pb(layout: KvLayout) -> common_pb2.KvLayout:
    return common_pb2.KvLayout(
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        dtype=layout.dtype,
        block_size=layout.block_size,
    )


def layout_from_pb(pb: common_pb2.KvLayout) -> KvLayout:
    return KvLayout(
        num_layers=pb.num_layers,
        num_kv_heads=pb.num_kv_heads,
        head_dim=pb.head_dim,
        dtype=pb.dtype,
        block_size=pb.block_size,
    )


def sampling_to_pb(sp: SamplingParams) -> common_pb2.SamplingParams:
    pb = common_pb2.SamplingParams(
        max_tokens=sp.max_tokens,
        temperature=sp.temperature,
        top_p=sp.top_p,
        top_k=sp.top_k,
        ignore_eos=sp.ignore_eos,
    )
    if sp.seed is not None:
        pb.seed = sp.seed
    return pb


def sampling_from_pb(pb: common_pb2.SamplingParams) -> SamplingParams:
    """Raises ValueError (naming the field) for out-of-range values."""
    return SamplingParams(
        max_tokens=pb.max_tokens,
        temperature=pb.temperature,
        top_p=pb.top_p or 1.0,  # proto3 default 0 = unset
        top_k=pb.top_k,
        seed=pb.seed if pb.HasField("seed") else None,
        ignore_eos=pb.ignore_eos,
    )
