"""The scheduler's view of the workers: Redis heartbeats + its own in-flight accounting.

1. Heartbeats: every ``refresh_s`` the worker records are re-read from Redis and
   turned into policy ``WorkerView``s once (not per request); a change bumps
   ``version`` so the decision log writes the views only when they change.
   Only workers that can serve this scheduler's requests are kept
   (``routable``): its model, and one KV layout for all of them (the one given,
   else the one most of them share), so any prefill can hand off to any
   decode. Others are skipped, logged once and counted in ``bad_records``.
   Every Redis call has a deadline (``call_timeout_s``); when one fails the
   last view stays, and for ``outage_grace_s`` after an outage a worker whose
   record expired meanwhile is kept (it could not heartbeat either) until it
   re-registers. Redis is never on a request's path: requests read the views.
2. Loads: what this scheduler has sent to each worker and not seen finish --
   prefills queued or running (requests, uncached tokens) and decode streams
   (requests, KV blocks). Exact and immediate, where heartbeats lag.
   Replicas share them (docs/adr/0005): each refresh writes this replica's
   loads to Redis (``SchedulerLoads``, TTL a few refreshes) and reads the
   others'; with peers live, each change on a prefill worker (bookings,
   dispatch slots) is also pushed (rewritten and PUBLISHed, at most one push
   in flight and one every ``PUSH_MIN_S``) and
   the peers' pushes are taken in as they come. Decisions see own + peers'
   loads, the peers' milliseconds old (two refresh periods when pushes do not
   arrive). A dead replica's loads vanish with its record's TTL.
3. Cost models: each observed ``prefill_ms`` refines that worker's model; the
   models of workers no longer in the view are dropped.
4. Prefix index: prompts prefilled on a worker are recorded there at once (in
   memory), and every ``PREFIX_REFRESH_S`` each worker's own published cache
   (``PrefixSet`` in Redis, read only when its version changed) replaces that
   guess, so every replica routes on the same index and evictions show.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from disagg.metastore.store import OUTAGE_GRACE_S, MetaStore
from disagg.policy.cost import CostModel
from disagg.policy.prefix import PrefixIndex
from disagg.policy.routing import NO_LOAD, Decision, Load, Snapshot, WorkerView, blocks_needed
from disagg.runtime.shutdown import cancel_and_wait
from disagg.v1 import common_pb2, control_pb2
from services.scheduler.dispatch import NO_PEERS, PeerSlots

log = logging.getLogger(__name__)

RESTARTS_REFRESH_S = 2.0  # how often the supervisor's restart counts are re-read
PREFIX_REFRESH_S = 1.0  # how often the workers' published prefix caches are checked
PUSH_MIN_S = 0.005  # the least time between two pushes of this replica's loads
WATCH_RETRY_S = 1.0  # the peers' pushes not received (Redis away): watch again after this

_ROLE = {common_pb2.WORKER_ROLE_PREFILL: "prefill", common_pb2.WORKER_ROLE_DECODE: "decode"}


def view_of(i: common_pb2.WorkerInfo) -> WorkerView:
    return WorkerView(
        worker_id=i.worker_id,
        address=i.address,
        role=_ROLE.get(i.role, "unknown"),
        free_blocks=i.free_blocks,
        total_blocks=i.total_blocks,
        block_size=i.layout.block_size or 1,
        queued_prefill_tokens=i.queued_prefill_tokens,
        running=i.running_requests,
        waiting=i.waiting_requests,
    )


def _layout_text(layout: common_pb2.KvLayout) -> str:
    x = layout
    return (
        f"{x.num_layers}x{x.num_kv_heads}x{x.head_dim} {x.dtype or '?'} block_size={x.block_size}"
    )


def common_layout(infos: Sequence[common_pb2.WorkerInfo]) -> common_pb2.KvLayout | None:
    """The layout most of infos share; on a tie, the longest-running worker's."""
    groups: dict[bytes, list[common_pb2.WorkerInfo]] = {}
    for i in infos:
        groups.setdefault(i.layout.SerializeToString(deterministic=True), []).append(i)
    if not groups:
        return None
    best = min(
        groups.values(),
        key=lambda g: (-len(g), min((i.started_unix_ms, i.worker_id) for i in g)),
    )
    return best[0].layout


def routable(
    infos: Sequence[common_pb2.WorkerInfo], model: str, layout: common_pb2.KvLayout | None
) -> tuple[list[common_pb2.WorkerInfo], dict[str, str]]:
    """The workers a scheduler of model ("" = any) can route to, and why each other is not.

    A worker of another model would answer with the wrong vocabulary; one whose KV
    layout differs from the others' cannot hand KV to them. layout None: the layout
    most workers of the model share (``common_layout``)."""
    skipped: dict[str, str] = {}
    same_model = []
    for i in infos:
        if model and i.model != model:
            skipped[i.worker_id] = f"model {i.model!r}, this scheduler serves {model!r}"
        else:
            same_model.append(i)
    want = layout if layout is not None else common_layout(same_model)
    out = []
    for i in same_model:
        if want is not None and i.layout != want:
            skipped[i.worker_id] = (
                f"KV layout {_layout_text(i.layout)}, the deployment's is {_layout_text(want)}"
            )
        else:
            out.append(i)
    return out, skipped


@dataclass
class Reservation:
    """One request's share of the loads; undone piecewise as its phases end."""

    prefill_worker: str  # where its prompt is prefilled (a decode worker when local)
    prefill_tokens: int
    decode_worker: str
    decode_blocks: int
    prefill_open: bool = True


def sum_loads(records: Iterable[control_pb2.SchedulerLoads]) -> dict[str, Load]:
    """Per worker, the loads of every record added up."""
    out: dict[str, Load] = {}
    for r in records:
        out = merge_loads(out, {x.worker_id: Load(x.requests, x.tokens, x.blocks) for x in r.loads})
    return out


def merge_loads(a: Mapping[str, Load], b: Mapping[str, Load]) -> dict[str, Load]:
    out = dict(a)
    for w, x in b.items():
        y = out.get(w, NO_LOAD)
        out[w] = Load(x.requests + y.requests, x.tokens + y.tokens, x.blocks + y.blocks)
    return out


class WorkerRegistry:
    def __init__(
        self,
        store: MetaStore,
        refresh_s: float,
        prior: CostModel | None = None,
        replica_id: str = "",
        *,
        model: str = "",
        layout: common_pb2.KvLayout | None = None,
        outage_grace_s: float = OUTAGE_GRACE_S,
    ):
        """model: the served model name workers must report ("" = any); layout: the KV
        layout they must have (None = the one most of them share)."""
        self._store = store
        self._refresh_s = refresh_s
        self.model = model
        self._layout = layout
        self._outage_grace_s = outage_grace_s
        self._failed_at: float | None = None  # monotonic time of the last failed worker read
        self._records: list[common_pb2.WorkerInfo] = []  # the last records read, unfiltered
        self.mismatched: dict[str, str] = {}  # worker id -> why it is not routed to (now)
        self.mismatched_total = 0  # workers found not routable, each counted when first seen
        self._infos: list[common_pb2.WorkerInfo] = []
        self._views: list[WorkerView] = []
        # Tokens the largest decode worker's KV pool holds; 0: no decode worker in view.
        self.decode_capacity = 0
        self.version = 0
        self.loads: dict[str, Load] = {}
        self.costs: dict[str, CostModel] = {}
        self._prior = prior or CostModel()
        self.prefix = PrefixIndex()
        self.on_cost: Callable[[str, CostModel], None] | None = None  # decision log hook
        self.restarts: dict[str, int] = {}  # service -> restarts by `disagg up` (for /metrics)
        self.replica_id = replica_id
        self.peers: dict[str, Load] = {}  # the other replicas' loads, summed per worker
        self._peer_records: dict[str, control_pb2.SchedulerLoads] = {}  # replica -> newest
        self._peer_seen: dict[str, float] = {}  # replica -> monotonic time its record came
        self._seq = 0  # of this replica's load records
        self._push: asyncio.Task[None] | None = None  # pushing this replica's loads
        self._pushed_dirty = False  # loads changed since the push in flight read them
        self._push_failing = False  # the last push failed (logged once until one lands)
        self._watch: asyncio.Task[None] | None = None
        self._stopped = False
        self._peer_slots: dict[str, PeerSlots] = {}
        self._prefill_ids: set[str] = set()  # prefill workers in view: their loads are pushed
        # Hooks of the dispatch queue: its per-worker (in flight, best waiter's rank), and
        # a call when the peers' figures changed.
        self.dispatch_state: Callable[[], dict[str, tuple[int, float]]] = dict
        self.on_peers: Callable[[], None] = lambda: None
        self._prefix_versions: dict[str, int] = {}  # worker -> version of its set we applied
        self.replicas = 1  # live scheduler replicas, this one included (last refresh)
        self._task: asyncio.Task[None] | None = None
        self._listed_at = float("-inf")  # monotonic start of the last worker listing that landed
        self._heartbeat_ms: dict[str, int] = {}  # worker -> wall time of its last heartbeat read
        self._done_ms: dict[str, int] = {}  # worker -> wall time a prefill (ours, a peer's) ended
        self._refreshing: asyncio.Future[None] | None = None

    async def start(self) -> None:
        await self.refresh()
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._loop())
        if self.replica_id:
            self._watch = loop.create_task(self._watch_peers())

    async def stop(self) -> None:
        # No push after this (leave() withdraws the record for good), and the loops end at
        # their next turn even if the cancel below is lost: redis-py can turn a
        # cancellation in the middle of a command into a ConnectionError, which the loops
        # take as an outage and go on (the scheduler's stop then hung for good).
        self._stopped = True
        for task in (self._task, self._watch, self._push):
            await cancel_and_wait(task)

    @property
    def call_timeout_s(self) -> float:
        """Deadline of each Redis call: a hung one (Redis black-holed) must not stall the
        refreshes for the socket timeout times the retries."""
        return max(1.0, 4 * self._refresh_s)

    async def fresh(self, max_age_s: float = 0.05) -> None:
        """A refresh, unless a listing younger than max_age_s landed; concurrent callers
        share one (a burst of requests that found no worker costs one Redis listing)."""
        if time.monotonic() - self._listed_at <= max_age_s:
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self.refresh())
        await asyncio.shield(self._refreshing)

    async def refresh(self) -> None:
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.call_timeout_s):
                records = await self._store.list_workers()
        except Exception as e:
            self._failed_at = time.monotonic()
            log.warning("worker registry refresh failed: %s", e or type(e).__name__)
        else:
            self.set_infos(self._through_outage(records))
            self._listed_at = started
        if self.replica_id:
            await self._share_loads()

    def _through_outage(self, records: list[common_pb2.WorkerInfo]) -> list[common_pb2.WorkerInfo]:
        """records, plus, shortly after Redis was unreachable, the workers last seen
        whose records expired meanwhile: their heartbeats could not land either, and
        until they re-register they are as alive as before the outage."""
        if self._failed_at is None:
            return records
        if time.monotonic() - self._failed_at > self._outage_grace_s:
            self._failed_at = None
            return records
        have = {i.worker_id for i in records}
        return [*records, *(i for i in self._records if i.worker_id not in have)]

    def _record(self) -> control_pb2.SchedulerLoads:
        self._seq += 1
        slots = self.dispatch_state()
        loads = []
        for w in {**self.loads, **slots}:
            x = self.loads.get(w, NO_LOAD)
            running, head = slots.get(w, (0, 0.0))
            loads.append(
                control_pb2.WorkerLoad(
                    worker_id=w,
                    requests=x.requests,
                    tokens=x.tokens,
                    blocks=x.blocks,
                    dispatched=running,
                    head_rank_ms=head,
                )
            )
        return control_pb2.SchedulerLoads(
            replica_id=self.replica_id,
            loads=loads,
            unix_ms=int(time.time() * 1000),
            seq=self._seq,
        )

    def _peers_changed(self) -> None:
        records = self._peer_records.values()
        self.peers = sum_loads(records)
        slots: dict[str, PeerSlots] = {}
        for r in records:
            for x in r.loads:
                if x.dispatched or x.head_rank_ms:
                    had = slots.get(x.worker_id, NO_PEERS)
                    head = x.head_rank_ms or math.inf
                    slots[x.worker_id] = PeerSlots(had.running + x.dispatched, min(had.head, head))
        self._peer_slots = slots
        self.on_peers()

    def peer_slots(self, worker_id: str) -> PeerSlots:
        """The other replicas' prefills in flight on the worker and their best waiter."""
        return self._peer_slots.get(worker_id, NO_PEERS)

    async def _share_loads(self) -> None:
        """Publishes this replica's loads and takes in the other replicas' (the listing
        says who is live; of two records of a replica, the newer counts)."""
        try:
            async with asyncio.timeout(self.call_timeout_s):
                await self._store.put_scheduler_loads(self._record(), self.loads_ttl_s)
                records = await self._store.list_scheduler_loads()
        except Exception as e:
            log.warning("sharing scheduler loads failed: %s", e or type(e).__name__)
            self._forget_silent_peers()
            return
        known, self._peer_records = self._peer_records, {}
        now = time.monotonic()
        for r in records:
            if r.replica_id != self.replica_id:
                had = known.get(r.replica_id)
                if had is not None and r.seq > had.seq:
                    self._note_peer_prefills_done(had, r)
                self._peer_records[r.replica_id] = r if had is None or r.seq > had.seq else had
                self._peer_seen[r.replica_id] = now
        self._peer_seen = {p: t for p, t in self._peer_seen.items() if p in self._peer_records}
        self._peers_changed()
        self.replicas = max(1, len(records))

    def _forget_silent_peers(self) -> None:
        """Redis out of reach: a peer record not heard of for its TTL no longer counts
        (as it would have expired in Redis), so a dead or cut-off peer's prefills in
        flight cannot hold a worker's slots for the length of the outage."""
        cutoff = time.monotonic() - self.loads_ttl_s
        silent = [p for p, t in self._peer_seen.items() if t < cutoff]
        if silent:
            for p in silent:
                self._peer_records.pop(p, None)
                self._peer_seen.pop(p, None)
            self._peers_changed()
            self.replicas = 1 + len(self._peer_records)

    def _take_push(self, r: control_pb2.SchedulerLoads) -> None:
        """A peer's pushed record: counts at once if newer than what we have."""
        if r.replica_id == self.replica_id:
            return
        had = self._peer_records.get(r.replica_id)
        if had is not None and r.seq <= had.seq:
            return
        if had is not None:
            self._note_peer_prefills_done(had, r)
        self._peer_records[r.replica_id] = r
        self._peer_seen[r.replica_id] = time.monotonic()
        self._peers_changed()

    def _note_peer_prefills_done(
        self, old: control_pb2.SchedulerLoads, new: control_pb2.SchedulerLoads
    ) -> None:
        """A worker where a peer's queued prefill tokens went down had a prefill end (as
        ``prefill_done`` notes ours): its heartbeat queue from before no longer holds."""
        now_tokens = {x.worker_id: x.tokens for x in new.loads}
        stamp = int(time.time() * 1000)
        for x in old.loads:
            if x.tokens > now_tokens.get(x.worker_id, 0) and x.worker_id in self._prefill_ids:
                self._done_ms[x.worker_id] = stamp

    async def _watch_peers(self) -> None:
        while not self._stopped:
            try:
                async for record in self._store.watch_scheduler_loads(lambda: self._stopped):
                    self._take_push(record)
            except Exception as e:
                log.warning("watching peer scheduler loads failed: %s", e or type(e).__name__)
            await asyncio.sleep(WATCH_RETRY_S)

    def loads_changed(self) -> None:
        """Pushes this replica's loads soon, when there are peers to tell."""
        if not self.replica_id or self.replicas <= 1 or self._stopped:
            return  # alone: the refresh's write is enough for a replica that joins
        if self._push is not None and not self._push.done():
            self._pushed_dirty = True
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # booked outside a loop (tests): the refresh writes them
            return
        self._push = loop.create_task(self._push_loads())

    async def _push_loads(self) -> None:
        self._pushed_dirty = True
        while self._pushed_dirty:
            self._pushed_dirty = False
            try:
                async with asyncio.timeout(self.call_timeout_s):
                    await self._store.put_scheduler_loads(
                        self._record(), self.loads_ttl_s, push=True
                    )
            except Exception as e:
                if not self._push_failing:  # once per outage: pushes come with every change
                    log.warning("pushing scheduler loads failed: %s", e or type(e).__name__)
                self._push_failing = True
                return  # the refresh writes them again
            if self._push_failing:
                log.info("pushing scheduler loads again")
                self._push_failing = False
            await asyncio.sleep(PUSH_MIN_S)

    @property
    def loads_ttl_s(self) -> float:
        """How long this replica's published loads outlive its last refresh."""
        return max(1.0, 4 * self._refresh_s)

    async def leave(self) -> None:
        """Withdraws this replica's loads at once (a clean shutdown)."""
        if self.replica_id:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.call_timeout_s):
                    await self._store.remove_scheduler(self.replica_id)

    def set_infos(self, records: list[common_pb2.WorkerInfo]) -> None:
        """Takes in the worker records read from Redis (only the routable ones are kept)."""
        self._records = records
        infos, skipped = routable(records, self.model, self._layout)
        self._note_mismatches(skipped)
        self._infos = infos
        self._heartbeat_ms = {i.worker_id: i.heartbeat_unix_ms for i in infos}
        for w, done in list(self._done_ms.items()):  # a newer heartbeat has it counted
            if self._heartbeat_ms.get(w, done) >= done:
                del self._done_ms[w]
        views = sorted((view_of(i) for i in infos), key=lambda v: v.worker_id)
        if views != self._views:
            gone = {v.worker_id for v in self._views} - {v.worker_id for v in views}
            for w in gone:
                self.prefix.drop_worker(w)
                self._prefix_versions.pop(w, None)
            for v in views:
                self.prefix.set_capacity(v.worker_id, v.total_blocks)
            for i in infos:
                self._seed_cost(i)
            self._views = views
            self._prefill_ids = {v.worker_id for v in views if v.role == "prefill"}
            self.decode_capacity = max(
                (v.total_blocks * v.block_size for v in views if v.role == "decode"), default=0
            )
            self.version += 1
        self._prune_costs()

    def _note_mismatches(self, skipped: dict[str, str]) -> None:
        for worker_id, why in skipped.items():
            if worker_id not in self.mismatched:
                self.mismatched_total += 1
                log.warning("not routing to worker %s: %s", worker_id, why)
        self.mismatched = skipped

    def _prune_costs(self) -> None:
        """Only the workers in the view keep a cost model: one that left (and came back,
        maybe another process under its id) starts again from its own calibration."""
        live = {v.worker_id for v in self._views}
        for worker_id in [w for w in self.costs if w not in live]:
            del self.costs[worker_id]

    def _seed_cost(self, info: common_pb2.WorkerInfo) -> None:
        """A worker's own startup measurement replaces the prior until we observe it."""
        if info.worker_id in self.costs or info.prefill_base_ms + info.prefill_ms_per_token <= 0:
            return
        model = CostModel(base_ms=info.prefill_base_ms, per_token_ms=info.prefill_ms_per_token)
        self.costs[info.worker_id] = model
        if self.on_cost is not None:
            self.on_cost(info.worker_id, model)

    @property
    def bad_records(self) -> int:
        """Redis records skipped so far: malformed ones, and workers found not routable
        (another model or KV layout; each counted once when first seen). Neither stops
        a refresh."""
        return self._store.bad_records + self.mismatched_total

    def infos(self) -> list[common_pb2.WorkerInfo]:
        return list(self._infos)

    def snapshot(self) -> list[WorkerView]:
        return self._views

    def policy_snapshot(self) -> Snapshot:
        """The live loads (this replica's + its peers') and costs: decide before the next await."""
        loads = self.loads if not self.peers else merge_loads(self.loads, self.peers)
        return Snapshot(self._current_views(), loads, self.costs)

    def _current_views(self) -> list[WorkerView]:
        """The views, less a heartbeat's prefill queue where the heartbeat predates a
        prefill that ended there since (ours, or a peer's by its pushed loads): that queue
        was (also) the one we know is done, and taking it as a floor priced a prefix
        holder out right after it served. Our own and our peers' bookings still count
        (``loads``)."""
        views = self.snapshot()
        if not self._done_ms:
            return views
        return [
            dataclasses.replace(v, queued_prefill_tokens=0)
            if v.queued_prefill_tokens
            and self._done_ms.get(v.worker_id, 0) > self._heartbeat_ms.get(v.worker_id, 0)
            else v
            for v in views
        ]

    # --- in-flight accounting ------------------------------------------------------------

    def reserve(self, d: Decision, prompt_tokens: int, max_tokens: int) -> Reservation:
        pre = d.prefill.worker_id if d.prefill else d.decode.worker_id
        r = Reservation(
            pre,
            d.uncached_tokens,
            d.decode.worker_id,
            blocks_needed(prompt_tokens, max_tokens, d.decode.block_size),
        )
        self._add(r.prefill_worker, 1, r.prefill_tokens, 0)
        self._add(r.decode_worker, 0 if d.prefill is None else 1, 0, r.decode_blocks)
        return r

    def prefill_done(self, r: Reservation) -> None:
        if r.prefill_open:
            r.prefill_open = False
            self._done_ms[r.prefill_worker] = int(time.time() * 1000)
            local = r.prefill_worker == r.decode_worker
            self._add(r.prefill_worker, 0 if local else -1, -r.prefill_tokens, 0)

    def release(self, r: Reservation) -> None:
        self.prefill_done(r)
        self._add(r.decode_worker, -1, 0, -r.decode_blocks)

    def _add(self, worker_id: str, requests: int, tokens: int, blocks: int) -> None:
        old = self.loads.get(worker_id, NO_LOAD)
        new = Load(old.requests + requests, old.tokens + tokens, old.blocks + blocks)
        if new == NO_LOAD:
            self.loads.pop(worker_id, None)
        else:
            self.loads[worker_id] = new
        if worker_id in self._prefill_ids:  # decode loads: the refresh shares them
            self.loads_changed()

    # --- learning ------------------------------------------------------------------------

    def observe_prefill(self, worker_id: str, tokens: int, ms: float) -> None:
        if ms <= 0:
            return
        new = self.costs.get(worker_id, self._prior).refined(tokens, ms)
        self.costs[worker_id] = new
        if self.on_cost is not None:
            self.on_cost(worker_id, new)

    def record_prefix(self, worker_id: str, hashes: Sequence[bytes]) -> None:
        if hashes:
            self.prefix.record(worker_id, hashes)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        restarts_due = prefix_due = 0.0
        while not self._stopped:
            await asyncio.sleep(self._refresh_s)
            await self.refresh()
            if loop.time() >= prefix_due:
                prefix_due = loop.time() + PREFIX_REFRESH_S
                await self.sync_prefix()
            if loop.time() >= restarts_due:  # a rare event: no need to read it every refresh
                restarts_due = loop.time() + RESTARTS_REFRESH_S
                await self._refresh_restarts()

    async def sync_prefix(self) -> None:
        """Takes in each live worker's published prefix cache whose version changed."""
        try:
            async with asyncio.timeout(self.call_timeout_s):
                versions = await self._store.prefix_versions([v.worker_id for v in self._views])
                for worker_id, version in versions.items():
                    if self._prefix_versions.get(worker_id) != version:
                        await self._apply_prefix(worker_id)
        except Exception as e:
            log.warning("prefix index sync failed: %s", e or type(e).__name__)

    async def _apply_prefix(self, worker_id: str) -> None:
        record = await self._store.get_prefix_set(worker_id)
        if record is not None:
            self.prefix.replace(worker_id, record.block_hashes)
            self._prefix_versions[worker_id] = record.version

    async def _refresh_restarts(self) -> None:
        try:
            async with asyncio.timeout(self.call_timeout_s):
                self.restarts = await self._store.restarts()
        except Exception as e:
            log.warning("reading service restarts failed: %s", e or type(e).__name__)
