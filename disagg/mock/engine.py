"""MockEngine: the Engine protocol without a model, for driving the scheduler at scale.

Same contract as ``disagg.engine.engine.LLMEngine`` (see ``disagg.engine.api``),
so the real prefill/decode servicers, heartbeats and KV handoff run unchanged:

1. ``submit``: queued. A request is admitted when its blocks fit: the whole
   request (prompt + max_tokens) is reserved up front, through the real
   ``BlockAllocator`` with its prefix cache (cached prompt blocks are shared
   and cost nothing), so free-block accounting and prefix hits are real.
2. Each step is one prefill batch (FIFO, up to ``max_num_batched_tokens``
   uncached tokens) and/or one decode step of the running batch; the step
   *sleeps* ``prefill_ms(tokens) + step_ms(batch)`` of the cost model.
3. Tokens are deterministic: a function of (prompt, position), so a prefill
   worker's first token and a decode worker's continuation agree, and a local
   prefill gives the same stream. EOS is never produced; requests end on
   ``max_tokens`` (or ``abort``). ``tokens_per_step`` > 1 emits several tokens
   per request per step (a time-compressed stream for throughput benchmarks).
4. KV transfer moves zero bytes of the right size (``read_kv``/``write_kv``).
Outputs are delivered on the engine thread, outside its lock.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from disagg.engine.api import (
    EngineRequest,
    EngineStats,
    FinishReason,
    KvLayout,
    ModelInfo,
    RequestMode,
    TokenOutput,
)
from disagg.engine.config import EngineConfig
from disagg.kvpool.allocator import BlockAllocator
from disagg.kvpool.handoff import KVHandoff
from disagg.kvpool.hashing import blocks_for, prompt_hashes
from disagg.runtime.config import from_env

MOCK_VOCAB = 4096
MOCK_MAX_CONTEXT = 16384
MOCK_EOS = 2


@dataclass(frozen=True)
class MockConfig:
    prefill_base_ms: float = 2.0  # per prefill batch
    prefill_ms_per_token: float = 0.02  # per uncached prompt token
    step_base_ms: float = 5.0  # one decode step with a batch of one
    step_ms_per_seq: float = 0.05  # per sequence in the decode batch
    tokens_per_step: int = 1  # tokens per request per decode step
    num_blocks: int = 8192
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    vocab_size: int = MOCK_VOCAB
    max_context: int = MOCK_MAX_CONTEXT

    def __post_init__(self) -> None:
        if self.num_blocks <= 0 or self.block_size <= 0 or self.tokens_per_step <= 0:
            raise ValueError("num_blocks, block_size and tokens_per_step must be > 0")

    def prefill_ms(self, tokens: int) -> float:
        return self.prefill_base_ms + self.prefill_ms_per_token * tokens

    def step_ms(self, batch: int) -> float:
        return self.step_base_ms + self.step_ms_per_seq * batch


def mock_token(prev: int, position: int, vocab: int) -> int:
    """The token after ``prev`` at context position ``position``: never BOS/EOS/UNK.

    A function of the context's end, as a real model's greedy choice is of its
    context: recomputing from prompt + tokens so far (preemption, migration, a
    failed KV pull) continues the very same stream."""
    return 3 + (prev * 2654435761 + position * 40503) % (vocab - 3)


def mock_stream(prompt: list[int], n: int, vocab: int) -> list[int]:
    """The n tokens a mock worker generates for prompt."""
    out: list[int] = []
    prev, pos = prompt[-1], len(prompt)
    for _ in range(n):
        prev = mock_token(prev, pos, vocab)
        pos += 1
        out.append(prev)
    return out


@dataclass(eq=False)
class _Seq:
    req: EngineRequest
    last: int  # the context's last token: the next one derives from it
    pos: int  # the context's length
    uncached: int = 0
    cached: int = 0
    blocks: list[int] = field(default_factory=list)
    generated: int = 0
    submitted: float = 0.0
    started: float = 0.0
    aborted: bool = False


class MockEngine:
    def __init__(self, cfg: MockConfig | None = None, name: str = "mock"):
        self.cfg = cfg or MockConfig()
        c = self.cfg
        layout = KvLayout(
            num_layers=2, num_kv_heads=1, head_dim=8, dtype="float16", block_size=c.block_size
        )
        self.info = ModelInfo(name, "", c.vocab_size, c.max_context, (MOCK_EOS,), layout)
        self.tokenizer: object = None
        self.allocator = BlockAllocator(c.num_blocks)
        self._cv = threading.Condition()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._prefilling: list[_Seq] = []  # this step's prefill batch (outside both lists)
        self._handoff = KVHandoff(self.allocator)
        self._stop = False
        self._thread: threading.Thread | None = None

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mock-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # --- requests -------------------------------------------------------------------------

    def submit(self, req: EngineRequest) -> None:
        req.arrival_s = time.monotonic()
        prompt = req.prompt_token_ids
        seq = _Seq(req, prompt[-1] if prompt else 0, len(prompt), submitted=req.arrival_s)
        with self._cv:
            if req.mode is not RequestMode.DECODE and req.request_id in self._handoff:
                error = f"request {req.request_id!r} already holds KV"
                self._later(req, TokenOutput(req.request_id, (), FinishReason.ERROR, error))
                return
            if req.mode is RequestMode.DECODE:
                if self._handoff.imported(req.request_id) is None or req.first_token_id is None:
                    self._handoff.release(req.request_id)
                    self._later(
                        req, TokenOutput(req.request_id, (), FinishReason.ERROR, "no imported KV")
                    )
                    return
                seq.blocks, seq.generated = self._handoff.adopt(req.request_id)[0], 1
                seq.last, seq.pos = req.first_token_id, seq.pos + 1
            self._waiting.append(seq)
            self._cv.notify_all()

    def abort(self, request_id: str) -> None:
        outs: list[tuple[EngineRequest, TokenOutput]] = []
        with self._cv:
            for s in self._prefilling:
                if s.req.request_id == request_id:
                    s.aborted = True  # the step in progress cancels it
            for q in (self._waiting, self._running):
                for s in list(q):
                    if s.req.request_id == request_id:
                        q.remove(s)
                        s.aborted = True
                        self._free(s)
                        outs.append((s.req, TokenOutput(request_id, (), FinishReason.CANCELLED)))
            self._handoff.release(request_id)
        _deliver(outs)

    def cached_prefix(self) -> tuple[int, list[bytes]]:
        with self._cv:
            return self.allocator.cache_version, self.allocator.cached_hashes()

    def stats(self) -> EngineStats:
        with self._cv:
            queued = sum(
                len(s.req.prompt_token_ids)
                for s in self._waiting
                if s.req.mode is not RequestMode.DECODE
            )
            return EngineStats(
                free_blocks=self.allocator.free_blocks,
                total_blocks=self.allocator.total_blocks,
                running=len(self._running),
                waiting=len(self._waiting),
                queued_prefill_tokens=queued,
                held=self._handoff.num_held,
            )

    @staticmethod
    def _continue(s: _Seq, k: int, vocab: int) -> list[int]:
        out = []
        for _ in range(k):
            s.last = mock_token(s.last, s.pos, vocab)
            s.pos += 1
            out.append(s.last)
        return out

    # --- KV transfer ----------------------------------------------------------------------

    def held_blocks(self, request_id: str) -> tuple[list[int], int] | None:
        with self._cv:
            return self._handoff.held(request_id)

    def read_kv(self, block_ids: list[int], layer: int) -> tuple[bytes, bytes]:
        n = len(block_ids) * self.info.layout.bytes_per_block_per_layer
        return bytes(n), bytes(n)

    def release(self, request_id: str) -> bool:
        with self._cv:
            return self._handoff.release(request_id)

    def reserve_import(self, request_id: str, num_tokens: int) -> list[int] | None:
        with self._cv:
            return self._handoff.reserve(request_id, num_tokens, self.info.layout.block_size)

    def write_kv(self, block_ids: list[int], layer: int, k: bytes, v: bytes) -> None:
        """Nothing to write: the mock holds no tensors."""

    # --- the step loop --------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._waiting and not self._running:
                    self._cv.wait()
                if self._stop:
                    return
                batch = self._admit()
                self._prefilling = batch
                decoding = list(self._running)
            tokens = sum(s.uncached for s in batch)
            ms = (self.cfg.prefill_ms(tokens) if batch else 0.0) + (
                self.cfg.step_ms(len(decoding)) if decoding else 0.0
            )
            if ms > 0:
                time.sleep(ms / 1000)
            elif not batch and not decoding:  # blocked on blocks: let aborts/releases in
                time.sleep(0.001)
            with self._cv:
                outs = self._advance(batch, decoding, self.cfg.prefill_ms(tokens) if batch else 0.0)
            _deliver(outs)

    def _admit(self) -> list[_Seq]:
        """Moves waiting requests whose blocks fit into this step's prefill batch (FIFO)."""
        batch: list[_Seq] = []
        budget = self.cfg.max_num_batched_tokens
        bs = self.info.layout.block_size
        while self._waiting and len(self._running) + len(batch) < self.cfg.max_num_seqs:
            s = self._waiting[0]
            r = s.req
            n = len(r.prompt_token_ids)
            if r.mode is RequestMode.DECODE:
                extra = blocks_for(n + r.sampling.max_tokens, bs) - len(s.blocks)
                if extra > 0 and not self.allocator.can_allocate(extra):
                    break
                s.blocks += self.allocator.allocate(max(0, extra))
                self._waiting.popleft()
                s.started = time.monotonic()
                self._running.append(s)
                continue
            hashes = prompt_hashes(r.prompt_token_ids, bs, limit=(n - 1) // bs, salt=r.cache_salt)
            hit = 0
            for h in hashes:
                if self.allocator.lookup(h) is None:
                    break
                hit += 1
            total = n if r.mode is RequestMode.PREFILL_ONLY else n + r.sampling.max_tokens
            need = blocks_for(total, bs) - hit
            uncached = n - hit * bs
            if batch and uncached > budget:
                break
            if not self.allocator.can_allocate(need):
                break
            self._waiting.popleft()
            cached = []
            for h in hashes[:hit]:
                b = self.allocator.lookup(h)
                assert b is not None
                self.allocator.acquire(b)
                cached.append(b)
            s.blocks = cached + self.allocator.allocate(need)
            for b, h in zip(s.blocks[hit : len(hashes)], hashes[hit:], strict=False):
                self.allocator.register(b, h)
            s.uncached, s.cached, s.started = uncached, hit * bs, time.monotonic()
            budget -= uncached
            batch.append(s)
        return batch

    def _advance(
        self, batch: list[_Seq], decoding: list[_Seq], prefill_ms: float
    ) -> list[tuple[EngineRequest, TokenOutput]]:
        outs: list[tuple[EngineRequest, TokenOutput]] = []
        vocab = self.info.vocab_size
        self._prefilling = []
        for s in batch:
            r = s.req
            if s.aborted:
                self._free(s)
                outs.append((r, TokenOutput(r.request_id, (), FinishReason.CANCELLED)))
                continue
            if r.mode is RequestMode.PREFILL_ONLY and r.request_id in self._handoff:
                self._free(s)  # the same id prefilled twice at once: the first one keeps its KV
                error = f"request {r.request_id!r} already holds KV"
                outs.append((r, TokenOutput(r.request_id, (), FinishReason.ERROR, error)))
                continue
            first = s.last = mock_token(s.last, s.pos, vocab)
            s.pos += 1
            s.generated = 1
            queue_ms = (s.started - s.submitted) * 1000
            if r.mode is RequestMode.PREFILL_ONLY:
                self._handoff.hold(r.request_id, s.blocks, len(r.prompt_token_ids))
                fin: FinishReason | None = FinishReason.PREFILLED
            else:
                fin = FinishReason.LENGTH if r.sampling.max_tokens <= 1 else None
                if fin is None:
                    self._running.append(s)
                else:
                    self._free(s)
            outs.append(
                (r, TokenOutput(r.request_id, (first,), fin, None, queue_ms, prefill_ms, s.cached))
            )
        for s in decoding:
            if s.aborted:  # abort() already freed it and said so
                continue
            r = s.req
            k = min(self.cfg.tokens_per_step, r.sampling.max_tokens - s.generated)
            toks = tuple(self._continue(s, k, vocab))
            first_out = s.generated == 1 and r.mode is RequestMode.DECODE
            s.generated += k
            fin = FinishReason.LENGTH if s.generated >= r.sampling.max_tokens else None
            if fin is not None:
                self._running.remove(s)
                self._free(s)
            out = TokenOutput(r.request_id, toks, fin)
            if first_out:
                out = TokenOutput(
                    r.request_id, toks, fin, None, (s.started - s.submitted) * 1000, 0.0
                )
            outs.append((r, out))
        return outs

    def _free(self, s: _Seq) -> None:
        self.allocator.free_all(s.blocks)
        s.blocks = []

    def _later(self, req: EngineRequest, out: TokenOutput) -> None:
        threading.Thread(target=req.on_output, args=(out,), daemon=True).start()


def _deliver(outs: list[tuple[EngineRequest, TokenOutput]]) -> None:
    for req, out in outs:
        req.on_output(out)


def mock_engine_for(engine: EngineConfig, name: str = "mock") -> MockEngine:
    """A started MockEngine sized by the worker's engine flags; its timings from
    ``DISAGG_MOCK_*`` (e.g. ``DISAGG_MOCK_PREFILL_MS_PER_TOKEN``)."""
    base = from_env(MockConfig, prefix="DISAGG_MOCK_")
    cfg = dataclasses.replace(
        base,
        block_size=engine.block_size,
        num_blocks=engine.num_blocks or base.num_blocks,
        max_num_seqs=engine.max_num_seqs,
        max_num_batched_tokens=engine.max_num_batched_tokens,
    )
    eng = MockEngine(cfg, name)
    eng.start()
    return eng
