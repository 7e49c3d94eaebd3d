"""A request's state inside the engine.

``token_ids`` holds the prompt followed by every generated token;
``num_computed`` of them have KV in the pool (``block_ids``). A step feeds
``token_ids[num_computed : num_computed + n]``; when that reaches the end, the
step samples the next token. So decode is "one uncomputed token left", and a
preempted request simply recomputes from zero (prompt + generated) the same way.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from disagg.engine.api import EngineRequest, RequestMode
from disagg.kvpool.hashing import block_hash


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    req: EngineRequest
    token_ids: list[int]
    num_prompt: int
    generator: torch.Generator | None
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0
    block_ids: list[int] = field(default_factory=list)
    num_generated: int = 0  # counts DECODE's first_token_id
    # Chained content hashes of the full blocks of token_ids seen so far.
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered: int = 0  # leading blocks registered with the allocator
    cached_tokens: int = 0
    first_scheduled_s: float | None = None
    prefill_ms: float = 0.0
    reported_first: bool = False  # the first TokenOutput (with timings) was sent
    aborted: bool = False  # abort arrived while the sequence was in a forward
    # DECODE: its prompt KV came from another worker, unverifiable as the prompt's:
    # no block of it (nor any computed on top of it) goes into the prefix cache.
    kv_imported: bool = False

    @property
    def request_id(self) -> str:
        return self.req.request_id

    @property
    def mode(self) -> RequestMode:
        return self.req.mode

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def is_decoding(self) -> bool:
        return self.num_uncomputed == 1 and self.num_generated > 0

    def hash_of_block(self, i: int, block_size: int) -> bytes:
        """Content hash of full block i of token_ids (memoized, chained)."""
        while len(self.block_hashes) <= i:
            j = len(self.block_hashes)
            parent = self.block_hashes[j - 1] if j else (self.req.cache_salt or None)
            toks = self.token_ids[j * block_size : (j + 1) * block_size]
            self.block_hashes.append(block_hash(parent, toks))
        return self.block_hashes[i]

    def reset_for_recompute(self) -> None:
        """After preemption: no KV, back to waiting; generated tokens are kept."""
        self.block_ids = []
        self.num_computed = 0
        self.num_registered = 0
        self.kv_imported = False  # recomputed here: its blocks are this worker's own
        self.status = SeqStatus.WAITING
