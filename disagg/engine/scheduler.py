"""The engine's step scheduler (not the cluster scheduler): who runs in the next forward.

Each step, in order:

1. Running requests that decode (one token each), oldest first; then running
   requests still prefilling (next chunk within the token budget).
2. A running request that cannot get a block for its tokens preempts the
   youngest running request (its blocks are freed and it re-queues at the front
   of the waiting queue to recompute prompt + generated tokens); if it is itself
   the youngest, it preempts itself.
3. If nothing was preempted, waiting requests are admitted FIFO while the
   token budget, ``max_num_seqs`` and free blocks allow: prefix-cache hits
   first (shared full blocks, skipped by prefill), then the first chunk.
   A request that does not fit stays first in line (no overtaking).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from disagg.engine.sequence import SeqStatus, Sequence
from disagg.kvpool.allocator import BlockAllocator
from disagg.kvpool.hashing import blocks_for


@dataclass
class ScheduledBatch:
    """One step's work: decodes (one token each) first, then prefill chunks."""

    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (seq, chunk tokens)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def seqs(self) -> list[Sequence]:
        return self.decodes + [s for s, _ in self.prefills]

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)

    def remove(self, seq: Sequence) -> int:
        """Drops seq from this batch; returns the tokens it had (0 if absent)."""
        if seq in self.decodes:
            self.decodes.remove(seq)
            return 1
        for i, (s, n) in enumerate(self.prefills):
            if s is seq:
                del self.prefills[i]
                return n
        return 0


class Scheduler:
    def __init__(
        self,
        allocator: BlockAllocator,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_prefix_cache: bool,
    ) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_prefix_cache = enable_prefix_cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last is the youngest

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def queued_prefill_tokens(self) -> int:
        seqs = list(self.waiting) + self.running
        return sum(max(0, s.num_prompt - s.num_computed) for s in seqs)

    def remove(self, seq: Sequence) -> None:
        """Takes seq out of the queues. Its blocks stay with it: the engine frees or holds them."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        decoding = [s for s in self.running if s.num_uncomputed == 1]
        prefilling = [s for s in self.running if s.num_uncomputed > 1]
        for seq in decoding + prefilling:
            if seq.status is not SeqStatus.RUNNING or budget <= 0:
                continue
            n = min(seq.num_uncomputed, budget)
            if self._make_room(seq, n, batch):
                budget -= self._add(batch, seq, n)
        budget = self.max_num_batched_tokens - batch.num_tokens
        if not batch.preempted:
            self._admit(batch, budget)
        return batch

    def _add(self, batch: ScheduledBatch, seq: Sequence, n: int) -> int:
        if seq.num_uncomputed == 1:
            batch.decodes.append(seq)
        else:
            batch.prefills.append((seq, n))
        return n

    def _make_room(self, seq: Sequence, n: int, batch: ScheduledBatch) -> bool:
        """Blocks for seq's next n tokens, preempting the youngest as needed; False if seq went."""
        while not self._grow(seq, n):
            victim = self.running[-1]
            self._preempt(victim, batch)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        batch.remove(seq)
        self.allocator.free_all(seq.block_ids)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        batch.preempted.append(seq)

    def _grow(self, seq: Sequence, n: int) -> bool:
        """Allocates the blocks seq needs to hold num_computed + n tokens; False if short."""
        need = blocks_for(seq.num_computed + n, self.block_size) - len(seq.block_ids)
        if need <= 0:
            return True
        if not self.allocator.can_allocate(need):
            return False
        seq.block_ids.extend(self.allocator.allocate(need))
        return True

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self._take_prefix_hits(seq)
            n = min(seq.num_uncomputed, budget)
            if not self._grow(seq, n):
                self._drop_prefix_hits(seq, hits)
                return
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            budget -= self._add(batch, seq, n)

    def _take_prefix_hits(self, seq: Sequence) -> int:
        """Shares cached full blocks of seq's leading tokens (never its last token)."""
        if not self.enable_prefix_cache or seq.block_ids:
            return 0
        bs = self.block_size
        hits = 0
        for i in range((len(seq.token_ids) - 1) // bs):
            block = self.allocator.lookup(seq.hash_of_block(i, bs))
            if block is None:
                break
            self.allocator.acquire(block)
            seq.block_ids.append(block)
            hits += 1
        seq.num_computed = hits * bs
        seq.num_registered = hits
        if not seq.reported_first:
            seq.cached_tokens = hits * bs
        return hits

    def _drop_prefix_hits(self, seq: Sequence, hits: int) -> None:
        if not hits:
            return
        self.allocator.free_all(seq.block_ids)
        seq.block_ids = []
        seq.num_computed = seq.num_registered = 0
        if not seq.reported_first:
            seq.cached_tokens = 0

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publishes seq's newly completed full blocks to the prefix cache (never imported KV)."""
        if not self.enable_prefix_cache or seq.kv_imported:
            return
        full = seq.num_computed // self.block_size
        for i in range(seq.num_registered, full):
            self.allocator.register(seq.block_ids[i], seq.hash_of_block(i, self.block_size))
        seq.num_registered = max(seq.num_registered, full)
