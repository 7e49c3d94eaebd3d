"""The handoff's states: the transitions table, illegal moves, and the wire mapping."""

from __future__ import annotations

import itertools

import pytest

from disagg.engine.api import KvLayout
from disagg.transfer.handle import Handle, handle_from_pb, handle_to_pb
from disagg.transfer.state import (
    TRANSITIONS,
    HandoffState,
    IllegalTransition,
    advance,
    state_from_pb,
    state_to_pb,
)
from disagg.v1 import common_pb2

S = HandoffState


def test_the_lifecycle_moves_forward_only() -> None:
    assert {s for s in S if s.terminal} == {S.CONSUMED, S.EXPIRED, S.FAILED}
    assert set(TRANSITIONS) == set(S)
    path = [S.PREFILLING, S.READY, S.TRANSFERRING, S.CONSUMED]
    for current, new in itertools.pairwise(path):
        assert advance(current, new) is new
    for s in (S.READY, S.TRANSFERRING):  # a held handoff can end in every terminal state
        assert {S.CONSUMED, S.EXPIRED, S.FAILED} <= TRANSITIONS[s]


@pytest.mark.parametrize(("current", "new"), list(itertools.product(S, S)))
def test_every_move_outside_the_table_raises(current: S, new: S) -> None:
    if new in TRANSITIONS[current]:
        assert advance(current, new) is new
        return
    with pytest.raises(IllegalTransition, match=f"{current.name} -> {new.name}"):
        advance(current, new)


def test_no_way_back_and_no_second_ending() -> None:
    for terminal in (S.CONSUMED, S.EXPIRED, S.FAILED):
        for s in S:
            with pytest.raises(IllegalTransition):
                advance(terminal, s)
    with pytest.raises(IllegalTransition):
        advance(S.TRANSFERRING, S.READY)  # one puller: never handed out twice
    with pytest.raises(IllegalTransition):
        advance(S.PREFILLING, S.TRANSFERRING)  # nothing to pull before it is held


def test_wire_mapping_is_one_to_one() -> None:
    pbs = [state_to_pb(s) for s in S]
    assert len(set(pbs)) == len(S)
    assert common_pb2.KV_STATE_UNSPECIFIED not in pbs
    assert [state_from_pb(pb) for pb in pbs] == list(S)
    assert state_to_pb(S.READY) == common_pb2.KV_STATE_READY
    assert state_to_pb(S.EXPIRED) == common_pb2.KV_STATE_EXPIRED
    for bad in (common_pb2.KV_STATE_UNSPECIFIED, 99):
        with pytest.raises(ValueError, match="not a handoff state"):
            state_from_pb(bad)  # type: ignore[arg-type]


def test_handle_round_trips_through_its_record() -> None:
    layout = KvLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype="float16", block_size=16)
    handle = Handle("r1", "w1", "127.0.0.1:5", (7, 3, 9), 40, layout, 17, 1234)
    pb = handle_to_pb(handle, S.TRANSFERRING)
    assert pb.state == common_pb2.KV_STATE_TRANSFERRING and list(pb.block_ids) == [7, 3, 9]
    assert handle_from_pb(pb) == handle
    assert handle_from_pb(common_pb2.KvHandle.FromString(pb.SerializeToString())) == handle
