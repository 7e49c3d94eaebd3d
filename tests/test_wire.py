"""disagg/wire.py: protobuf <-> dataclass conversions round-trip, and bad values are refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from disagg.engine.api import MAX_TOP_K, KvLayout, SamplingParams
from disagg.v1 import common_pb2
from disagg.wire import layout_from_pb, layout_to_pb, sampling_from_pb, sampling_to_pb

INT32 = st.integers(-(2**31), 2**31 - 1)
FLOAT32 = {"width": 32, "allow_nan": False, "allow_infinity": False}

sampling_params = st.builds(
    SamplingParams,
    max_tokens=st.integers(1, 2**31 - 1),
    temperature=st.floats(0, 1e6, **FLOAT32),
    top_p=st.floats(0, 1, exclude_min=True, **FLOAT32),
    top_k=st.integers(0, MAX_TOP_K),
    seed=st.none() | st.integers(-(2**63), 2**63 - 1),
    ignore_eos=st.booleans(),
)
layouts = st.builds(
    KvLayout,
    num_layers=INT32,
    num_kv_heads=INT32,
    head_dim=INT32,
    dtype=st.sampled_from(["float32", "bfloat16", "float16"]) | st.text(max_size=12),
    block_size=INT32,
)


@given(sampling_params)
def test_sampling_round_trips(sp: SamplingParams) -> None:
    pb = sampling_to_pb(sp)
    assert pb.HasField("seed") == (sp.seed is not None)
    assert sampling_from_pb(pb) == sp
    assert sampling_from_pb(common_pb2.SamplingParams.FromString(pb.SerializeToString())) == sp


@pytest.mark.parametrize("seed", [None, 0, 7, -1])
def test_seed_presence_survives_the_wire(seed: int | None) -> None:
    pb = sampling_to_pb(SamplingParams(seed=seed))
    assert pb.HasField("seed") == (seed is not None)
    assert sampling_from_pb(pb).seed == seed


def test_unset_top_p_means_one() -> None:
    sp = sampling_from_pb(common_pb2.SamplingParams(max_tokens=3))
    assert sp == SamplingParams(max_tokens=3, temperature=0.0, top_p=1.0, seed=None)


@given(layouts)
def test_layout_round_trips(layout: KvLayout) -> None:
    assert layout_from_pb(layout_to_pb(layout)) == layout
    wire = layout_to_pb(layout).SerializeToString()
    assert layout_from_pb(common_pb2.KvLayout.FromString(wire)) == layout


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": MAX_TOP_K + 1}, "top_k"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
    ],
)
def test_invalid_sampling_is_a_value_error_naming_the_field(
    fields: dict[str, float], name: str
) -> None:
    pb = common_pb2.SamplingParams(**{"max_tokens": 4, **fields})
    with pytest.raises(ValueError, match=name):
        sampling_from_pb(pb)
