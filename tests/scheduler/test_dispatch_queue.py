"""The prefill dispatch order (disagg.policy.queue) and the dispatch queue around it.

test_policy_parts covers the aging trade-off and the wait bound under a stream
of short prompts; here: ranks and ties, then ``PrefillDispatch`` itself (depth,
release order, cancellation) on a real event loop, alone and as two replicas
sharing a worker's depth through their published slots.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from disagg.policy.queue import QueueOrder, Waiting
from services.scheduler.dispatch import DEFER_MAX_S, PeerSlots, PrefillDispatch
from tests.control.helpers import run_async

# --- QueueOrder ----------------------------------------------------------------------------


def test_shortest_expected_first_whatever_the_input_order() -> None:
    q = QueueOrder(aging=0.0, max_wait_ms=1e9)
    ws = [Waiting(0, 30.0, 0.0), Waiting(1, 10.0, 5.0), Waiting(2, 20.0, 1.0)]
    for perm in itertools.permutations(ws):
        assert q.pick(perm, 10.0).key == 1


def test_ties_go_to_the_lowest_key() -> None:
    q = QueueOrder(aging=0.0, max_wait_ms=1e9)
    ws = [Waiting(7, 5.0, 3.0), Waiting(3, 5.0, 3.0), Waiting(9, 5.0, 3.0)]
    assert q.pick(ws, 4.0).key == 3
    # Equal priority after aging (5 - 1*1 == 6 - 1*2): the key decides as well.
    aged = QueueOrder(aging=1.0, max_wait_ms=1e9)
    assert aged.rank(Waiting(4, 5.0, 1.0), 2.0)[1] == aged.rank(Waiting(2, 6.0, 0.0), 2.0)[1]
    assert aged.pick([Waiting(4, 5.0, 1.0), Waiting(2, 6.0, 0.0)], 2.0).key == 2


def test_aging_rate_scales_the_gain_per_ms_waited() -> None:
    long, short = Waiting(0, 100.0, 0.0), Waiting(1, 10.0, 95.0)
    half, full = QueueOrder(aging=0.5, max_wait_ms=1e9), QueueOrder(aging=1.0, max_wait_ms=1e9)
    assert half.rank(long, 100.0) == (1, 50.0, 0) and half.rank(short, 100.0) == (1, 7.5, 1)
    assert half.pick([long, short], 100.0).key == 1
    assert full.rank(long, 100.0) == (1, 0.0, 0) and full.rank(short, 100.0) == (1, 5.0, 1)
    assert full.pick([long, short], 100.0).key == 0


def test_the_wait_bound_beats_any_shorter_prompt_and_starts_at_max_wait() -> None:
    q = QueueOrder(aging=0.0, max_wait_ms=100.0)
    long = Waiting(0, 5000.0, 0.0)
    short = Waiting(1, 0.1, 99.0)
    assert q.pick([long, short], 99.9).key == 1  # waited 99.9 ms: not yet bounded
    assert q.pick([long, short], 100.0).key == 0  # waited exactly max_wait_ms: bounded
    assert q.rank(long, 100.0) == (0, 0.0, 0)


# --- PrefillDispatch -----------------------------------------------------------------------


class _Probe:
    """Prefills that hold their slot until let go; records entry order and concurrency."""

    def __init__(self, dispatch: PrefillDispatch, worker: str = "p0"):
        self.dispatch = dispatch
        self.worker = worker
        self.entered: list[str] = []
        self.inside = 0
        self.max_inside = 0
        self.go: dict[str, asyncio.Event] = {}

    async def prefill(self, name: str, expected_ms: float) -> None:
        self.go[name] = asyncio.Event()
        async with self.dispatch.slot(self.worker, expected_ms):
            self.entered.append(name)
            self.inside += 1
            self.max_inside = max(self.max_inside, self.inside)
            try:
                await self.go[name].wait()
            finally:
                self.inside -= 1

    def start(self, name: str, expected_ms: float) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(self.prefill(name, expected_ms))


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def _fifo_free() -> QueueOrder:
    return QueueOrder(aging=0.0, max_wait_ms=1e9)  # pure shortest-first: no clock in the order


async def _assert_no_leak(dispatch: PrefillDispatch, worker: str = "p0") -> None:
    """A fresh burst sees exactly ``depth`` slots: none leaked, none created."""
    probe = _Probe(dispatch, worker)
    tasks = [probe.start(f"fresh-{i}", 1.0) for i in range(dispatch.depth + 1)]
    await _settle()
    assert probe.inside == dispatch.depth and dispatch.waiting(worker) == 1
    for ev in list(probe.go.values()):
        ev.set()
    await asyncio.gather(*tasks)
    assert dispatch.waiting(worker) == 0


def test_at_most_depth_in_flight_and_the_rest_in_queue_order() -> None:
    async def scenario() -> None:
        dispatch = PrefillDispatch(_fifo_free(), depth=2)
        probe = _Probe(dispatch)
        tasks = [probe.start("a", 50.0), probe.start("b", 40.0)]
        await _settle()
        for name, ms in [("c", 30.0), ("d", 5.0), ("e", 20.0), ("f", 5.0)]:
            tasks.append(probe.start(name, ms))
        await _settle()
        assert probe.entered == ["a", "b"] and dispatch.waiting("p0") == 4
        for name in ["a", "b", "d", "f", "e", "c"]:
            probe.go[name].set()
            await _settle()
            assert probe.inside <= 2
        await asyncio.gather(*tasks)
        assert probe.entered == ["a", "b", "d", "f", "e", "c"]  # shortest first, ties by arrival
        assert probe.max_inside == 2
        await _assert_no_leak(dispatch)

    run_async(scenario())


def test_replicas_share_the_depth() -> None:
    """Two replicas keep one prefill each in flight per worker (depth 2 in all); when the
    other replica goes, this one takes the whole depth again."""

    async def scenario() -> None:
        replicas = [2]
        dispatch = PrefillDispatch(_fifo_free(), depth=2, replicas=lambda: replicas[0])
        probe = _Probe(dispatch)
        tasks = [probe.start(name, 10.0) for name in "abc"]
        await _settle()
        assert probe.entered == ["a"] and dispatch.waiting("p0") == 2
        replicas[0] = 1  # the peer's record expired
        probe.go["a"].set()
        await _settle()
        assert probe.entered == ["a", "b", "c"] and probe.inside == 2
        for name in "bc":
            probe.go[name].set()
        await asyncio.gather(*tasks)
        assert PrefillDispatch(_fifo_free(), depth=2, replicas=lambda: 3).depth == 1
        assert PrefillDispatch(_fifo_free(), depth=4, replicas=lambda: 3).depth == 2
        await _assert_no_leak(dispatch)

    run_async(scenario())


def test_workers_have_separate_queues() -> None:
    async def scenario() -> None:
        dispatch = PrefillDispatch(_fifo_free(), depth=1)
        p0, p1 = _Probe(dispatch, "p0"), _Probe(dispatch, "p1")
        tasks = [p0.start("a", 1.0), p1.start("b", 1.0), p0.start("c", 1.0)]
        await _settle()
        assert (p0.entered, p1.entered) == (["a"], ["b"])
        assert (dispatch.waiting("p0"), dispatch.waiting("p1")) == (1, 0)
        for name, probe in [("a", p0), ("b", p1)]:
            probe.go[name].set()
        await _settle()
        p0.go["c"].set()
        await asyncio.gather(*tasks)
        assert p0.entered == ["a", "c"]

    run_async(scenario())


def test_a_waiter_cancelled_before_its_turn_leaves_the_queue() -> None:
    async def scenario() -> None:
        dispatch = PrefillDispatch(_fifo_free(), depth=1)
        probe = _Probe(dispatch)
        holder = probe.start("holder", 1.0)
        await _settle()
        doomed, later = probe.start("doomed", 1.0), probe.start("later", 2.0)
        await _settle()
        assert dispatch.waiting("p0") == 2
        doomed.cancel()
        await _settle()
        assert doomed.cancelled() and dispatch.waiting("p0") == 1
        probe.go["holder"].set()
        await _settle()
        assert probe.entered == ["holder", "later"]
        probe.go["later"].set()
        await asyncio.gather(holder, later)
        await _assert_no_leak(dispatch)

    run_async(scenario())


def test_a_waiter_cancelled_just_after_being_picked_hands_its_slot_on() -> None:
    async def scenario() -> None:
        dispatch = PrefillDispatch(_fifo_free(), depth=1)
        probe = _Probe(dispatch)
        picked_then_cancelled: list[asyncio.Task[None]] = []

        async def holder() -> None:
            async with dispatch.slot("p0", 1.0):
                await probe.go["release"].wait()
            # The slot went to the shortest waiter; cancel it before it runs.
            picked_then_cancelled[0].cancel()

        probe.go["release"] = asyncio.Event()
        h = asyncio.get_running_loop().create_task(holder())
        await _settle()
        picked_then_cancelled.append(probe.start("picked", 1.0))
        nxt = probe.start("next", 5.0)
        await _settle()
        assert dispatch.waiting("p0") == 2
        probe.go["release"].set()
        await _settle()
        assert picked_then_cancelled[0].cancelled()
        assert probe.entered == ["next"]  # the slot was passed on, not lost
        probe.go["next"].set()
        await asyncio.gather(h, nxt)
        await _assert_no_leak(dispatch)

    run_async(scenario())


def test_cancelled_inside_the_slot_frees_it() -> None:
    async def scenario() -> None:
        dispatch = PrefillDispatch(_fifo_free(), depth=1)
        probe = _Probe(dispatch)
        running = probe.start("running", 1.0)
        await _settle()
        waiter = probe.start("waiter", 1.0)
        await _settle()
        running.cancel()
        await _settle()
        assert probe.entered == ["running", "waiter"]
        probe.go["waiter"].set()
        await waiter
        await _assert_no_leak(dispatch)

    run_async(scenario())


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError):
        PrefillDispatch(QueueOrder(), depth=0)


# --- replicas sharing the depth through their published slots -------------------------------


class _Pair:
    """Replicas A and B on one loop, each reading the other's ``state`` as its peers'
    slots: a push that arrives at once (the registry pushes it in milliseconds)."""

    def __init__(self, order: QueueOrder, depth: int) -> None:
        self.frozen: dict[str, PeerSlots] = {}  # replica -> slots its peer reads instead
        self.a: PrefillDispatch = self._make("a", order, depth)
        self.b: PrefillDispatch = self._make("b", order, depth)

    def _make(self, name: str, order: QueueOrder, depth: int) -> PrefillDispatch:
        def peers(worker_id: str) -> PeerSlots:
            other = "b" if name == "a" else "a"
            if other in self.frozen:
                return self.frozen[other]
            running, head = getattr(self, other).state().get(worker_id, (0, 0.0))
            return PeerSlots(running, head or float("inf"))

        def changed() -> None:  # our state changed: the peer re-checks its queue
            asyncio.get_running_loop().call_soon(getattr(self, "b" if name == "a" else "a").kick)

        return PrefillDispatch(order, depth, replicas=lambda: 2, peers=peers, on_change=changed)


def test_replicas_keep_the_workers_depth_and_hand_a_free_slot_to_the_best_waiter() -> None:
    async def scenario() -> None:
        pair = _Pair(QueueOrder(aging=1.0, max_wait_ms=1e9), depth=1)
        a, b = _Probe(pair.a), _Probe(pair.b)
        tasks = [a.start("a1", 50.0)]
        await _settle()
        tasks += [b.start("b1", 500.0)]  # queues: A's a1 holds the worker's one slot
        await _settle()
        tasks += [a.start("a2", 100.0), b.start("b2", 5.0)]
        await _settle()
        assert a.entered == ["a1"] and b.entered == [] and pair.b.waiting("p0") == 2
        a.go["a1"].set()  # the slot goes to B's b2 (best rank of either), not to A's a2
        await _settle()
        assert b.entered == ["b2"] and a.entered == ["a1"]
        b.go["b2"].set()
        await _settle()
        assert a.entered == ["a1", "a2"]  # ranks 100 before 500, whichever replica
        a.go["a2"].set()
        await _settle()
        assert b.entered == ["b2", "b1"]
        b.go["b1"].set()
        await asyncio.gather(*tasks)
        assert a.max_inside + b.max_inside == 2 and max(a.inside, b.inside) == 0
        assert pair.a.state() == {} and pair.b.state() == {}  # nothing left to publish

    run_async(scenario())


def test_a_slot_left_to_a_peer_that_does_not_take_it_is_taken_after_the_deferral() -> None:
    async def scenario() -> None:
        pair = _Pair(QueueOrder(aging=1.0, max_wait_ms=1e9), depth=1)
        a = _Probe(pair.a)
        # B published a better waiter a moment ago, which is gone (its push not here yet).
        pair.frozen["b"] = PeerSlots(running=0, head=0.0)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        task = a.start("a1", 10.0)
        await _settle()
        assert a.entered == []  # left to B's better waiter
        while not a.entered:
            await asyncio.sleep(0.002)
        assert loop.time() - t0 >= DEFER_MAX_S * 0.9
        a.go["a1"].set()
        await task

    run_async(scenario())


def test_a_peers_prefills_in_flight_count_against_the_depth() -> None:
    async def scenario() -> None:
        pair = _Pair(QueueOrder(aging=1.0, max_wait_ms=1e9), depth=2)
        pair.frozen["b"] = PeerSlots(running=2, head=float("inf"))  # B fills the worker
        a = _Probe(pair.a)
        task = a.start("a1", 10.0)
        await asyncio.sleep(2 * DEFER_MAX_S)
        assert a.entered == []
        pair.frozen["b"] = PeerSlots(running=1, head=float("inf"))  # one of B's ended
        pair.a.kick()  # as the registry does when B's push arrives
        await _settle()
        assert a.entered == ["a1"]
        a.go["a1"].set()
        await task

    run_async(scenario())
