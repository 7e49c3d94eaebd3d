"""The handoff's one state enum, its legal transitions, and its wire form.

A handoff moves forward only; CONSUMED, EXPIRED and FAILED are terminal and
each frees the owner's blocks once. The transitions are written here once and
every state change goes through ``advance``, which raises on anything else.
``common_pb2.KvState`` (the Redis record's state) is mapped here and nowhere else.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from disagg.v1 import common_pb2


class HandoffState(str, enum.Enum):
    PREFILLING = "prefilling"  # the prompt is running (only a streamed prefill has a handle)
    READY = "ready"  # blocks held under a lease, handle published
    TRANSFERRING = "transferring"  # one receiver's fetch is under way
    CONSUMED = "consumed"  # the receiver has every block; owner frees
    EXPIRED = "expired"  # the lease ran out first; owner frees
    FAILED = "failed"  # fetch failed or cancelled; owner frees

    @property
    def terminal(self) -> bool:
        return not TRANSITIONS[self]


_S = HandoffState
TRANSITIONS: Mapping[HandoffState, frozenset[HandoffState]] = {
    _S.PREFILLING: frozenset({_S.READY, _S.FAILED}),
    # READY -> CONSUMED: a transport that reads the blocks without the owner's
    # help (NIXL READ) never passes through TRANSFERRING on the owner's side.
    _S.READY: frozenset({_S.TRANSFERRING, _S.CONSUMED, _S.EXPIRED, _S.FAILED}),
    _S.TRANSFERRING: frozenset({_S.CONSUMED, _S.EXPIRED, _S.FAILED}),
    _S.CONSUMED: frozenset(),
    _S.EXPIRED: frozenset(),
    _S.FAILED: frozenset(),
}


class IllegalTransition(ValueError):
    """A state change the lifecycle does not allow: a bug, never a runtime condition."""


def advance(current: HandoffState, new: HandoffState) -> HandoffState:
    """Returns ``new`` if ``current -> new`` is legal; raises IllegalTransition otherwise."""
    if new not in TRANSITIONS[current]:
        raise IllegalTransition(f"handoff state {current.name} -> {new.name} is not allowed")
    return new


_TO_PB: Mapping[HandoffState, common_pb2.KvState] = {
    _S.PREFILLING: common_pb2.KV_STATE_PREFILLING,
    _S.READY: common_pb2.KV_STATE_READY,
    _S.TRANSFERRING: common_pb2.KV_STATE_TRANSFERRING,
    _S.CONSUMED: common_pb2.KV_STATE_CONSUMED,
    _S.EXPIRED: common_pb2.KV_STATE_EXPIRED,
    _S.FAILED: common_pb2.KV_STATE_FAILED,
}
_FROM_PB: Mapping[int, HandoffState] = {int(pb): state for state, pb in _TO_PB.items()}


def state_to_pb(state: HandoffState) -> common_pb2.KvState:
    return _TO_PB[state]


def state_from_pb(pb: common_pb2.KvState) -> HandoffState:
    """Raises ValueError for KV_STATE_UNSPECIFIED or a value this version does not know."""
    state = _FROM_PB.get(int(pb))
    if state is None:
        raise ValueError(f"state: {pb} is not a handoff state")
    return state
