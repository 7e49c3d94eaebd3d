"""LLMEngine: the paged, continuously batching engine behind every worker.

Implements the ``Engine`` protocol of ``disagg.engine.api``. One background
thread runs ``step`` = schedule -> run -> postprocess. Public methods may be
called from any thread; they take ``_lock`` briefly and never wait for a forward
pass. ``on_output`` callbacks run on the engine thread, outside the lock.

Block ownership: every block id a request holds is freed exactly once -- on
finish, abort, failure or preemption -- except a PREFILL_ONLY request's blocks,
which the ``KVHandoff`` holds until ``release``; ``reserve_import`` blocks wait
there until a DECODE ``submit`` adopts them or ``release`` frees them.
A request inside a running forward is only marked aborted; the engine thread
frees it after the forward, so no block is reused while it is being written.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import torch

from disagg.engine.api import (
    EngineRequest,
    EngineStats,
    FinishReason,
    KvProgress,
    RequestMode,
    TokenOutput,
)
from disagg.engine.compile import StepCompiler
from disagg.engine.config import EngineConfig
from disagg.engine.kv_cache import KVCache, blocks_for_budget
from disagg.engine.model_loader import load_model, pick_device
from disagg.engine.models import NativeModel
from disagg.engine.runner import NativeRunner, make_runner
from disagg.engine.sampler import make_generator, sample
from disagg.engine.scheduler import ScheduledBatch, Scheduler
from disagg.engine.sequence import SeqStatus, Sequence
from disagg.engine.threads import on_passing_thread
from disagg.kvpool.allocator import BlockAllocator
from disagg.kvpool.handoff import KVHandoff
from disagg.kvpool.hashing import blocks_for

log = logging.getLogger(__name__)

_Emit = tuple[Callable[[TokenOutput], None], TokenOutput]
_Picked = int | Exception | None  # a row's sampled token, no token this step, or its error


class LLMEngine:
    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        on_passing_thread(self._load)
        self.scheduler = Scheduler(
            self.allocator,
            self.info.layout.block_size,
            cfg.max_num_seqs,
            cfg.max_num_batched_tokens,
            cfg.enable_prefix_cache,
        )
        self._eos = frozenset(self.info.eos_token_ids)
        self._lock = threading.Condition(threading.RLock())
        self._seqs: dict[str, Sequence] = {}  # waiting or running
        self._handoff = KVHandoff(self.allocator)  # held for a pull, reserved for an import
        self._inflight: set[Sequence] = set()
        self._pending: list[_Emit] = []  # outputs decided off the engine thread
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.num_preemptions = 0  # requests preempted for recompute since start (a metric)

    def _load(self) -> None:
        cfg = self.cfg
        model, self.tokenizer, self.info = load_model(cfg)
        layout = self.info.layout
        num_blocks = cfg.num_blocks or blocks_for_budget(layout, cfg.kv_cache_mb)
        device = pick_device(cfg.device)
        self.kv = KVCache(layout, num_blocks, device)
        self.allocator = BlockAllocator(num_blocks)
        native = isinstance(model, NativeModel)
        self.model_impl = "native" if native else "transformers"
        self.compiler = StepCompiler(cfg.compile and native, device, cfg.max_num_seqs)
        self.runner = make_runner(model, self.kv, device, self.compiler, cfg.decode_kernel)

    # Lifecycle.

    def start(self) -> None:
        on_passing_thread(self._warm_up)
        with self._lock:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="disagg-engine", daemon=True)
            self._thread.start()

    def _warm_up(self) -> None:
        """Compiles decode buckets ahead (native path, compile on), within the configured time."""
        runner = self.runner
        if not isinstance(runner, NativeRunner) or self._thread is not None:
            return
        self.compiler.configure_thread()
        with self._lock:
            if not self.allocator.can_allocate(1):
                return
            (block,) = self.allocator.allocate(1)
        try:
            self.compiler.warmup(lambda b: runner.warm(b, block), self.cfg.compile_warmup_s)
        finally:
            with self._lock:
                self.allocator.free_all([block])

    def stop(self) -> None:
        """Cancels waiting/running requests and joins the engine thread. Held KV stays held."""
        with self._lock:
            thread, self._stopping = self._thread, True
            self._lock.notify_all()
        if thread is not None:
            thread.join()
        with self._lock:
            self._thread = None

    # Requests.

    def submit(self, req: EngineRequest) -> None:
        req.arrival_s = time.monotonic()
        with self._lock:
            error = self._validate(req)
            if error is not None:
                if req.mode is RequestMode.DECODE:
                    self._handoff.release(req.request_id)
                self._emit_later(req, TokenOutput(req.request_id, (), FinishReason.ERROR, error))
                return
            seq = self._new_sequence(req)
            if seq is not None:
                self._seqs[req.request_id] = seq
                self.scheduler.add(seq)
            self._lock.notify_all()

    def abort(self, request_id: str) -> None:
        with self._lock:
            seq = self._seqs.get(request_id)
            if seq is not None:
                if seq in self._inflight:
                    seq.aborted = True
                else:
                    self._finish(seq, FinishReason.CANCELLED, (), self._pending)
            self._handoff.release(request_id)
            self._lock.notify_all()

    def cached_prefix(self) -> tuple[int, list[bytes]]:
        with self._lock:
            return self.allocator.cache_version, self.allocator.cached_hashes()

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                free_blocks=self.allocator.free_blocks,
                total_blocks=self.allocator.total_blocks,
                running=len(self.scheduler.running),
                waiting=len(self.scheduler.waiting),
                queued_prefill_tokens=self.scheduler.queued_prefill_tokens(),
                held=self._handoff.num_held,
            )

    # KV transfer.

    def held_blocks(self, request_id: str) -> tuple[list[int], int] | None:
        with self._lock:
            return self._handoff.held(request_id)

    def read_kv(self, block_ids: list[int], layer: int) -> tuple[bytes, bytes]:
        return self.kv.read(block_ids, layer)

    def release(self, request_id: str) -> bool:
        with self._lock:
            released = self._handoff.release(request_id)
            self._lock.notify_all()
            return released

    def reserve_import(self, request_id: str, num_tokens: int) -> list[int] | None:
        with self._lock:
            if request_id in self._seqs:
                raise ValueError(f"request {request_id!r} is active")
            return self._handoff.reserve(request_id, num_tokens, self.info.layout.block_size)

    def write_kv(self, block_ids: list[int], layer: int, k: bytes, v: bytes) -> None:
        self.kv.write(block_ids, layer, k, v)

    # Submission helpers (under the lock).

    def _validate(self, req: EngineRequest) -> str | None:
        n = len(req.prompt_token_ids)
        if req.request_id in self._seqs:
            return f"request {req.request_id!r} is already active"
        if n == 0:
            return "empty prompt"
        if n >= self.info.max_context:
            return f"prompt of {n} tokens does not fit the context of {self.info.max_context}"
        vocab = self.info.vocab_size
        if any(not 0 <= t < vocab for t in req.prompt_token_ids):
            return "prompt token id out of vocabulary range"
        total = min(n + req.sampling.max_tokens, self.info.max_context)
        if req.mode is RequestMode.PREFILL_ONLY:
            total = n
        if blocks_for(total, self.info.layout.block_size) > self.allocator.total_blocks:
            return "request needs more KV blocks than the pool has"
        if req.on_kv_progress is not None and req.mode is not RequestMode.PREFILL_ONLY:
            return "on_kv_progress is for PREFILL_ONLY requests"
        if req.mode is not RequestMode.DECODE and req.request_id in self._handoff:
            return f"request {req.request_id!r} already holds KV"
        if req.mode is RequestMode.DECODE:
            imported = self._handoff.imported(req.request_id)
            if req.first_token_id is None or not 0 <= req.first_token_id < vocab:
                return "DECODE needs a valid first_token_id"
            if imported is None:
                return "DECODE request has no imported KV"
            if imported[1] != n:
                return f"imported KV covers {imported[1]} tokens, prompt has {n}"
        return None

    def _new_sequence(self, req: EngineRequest) -> Sequence | None:
        seq = Sequence(
            req=req,
            token_ids=list(req.prompt_token_ids),
            num_prompt=len(req.prompt_token_ids),
            generator=make_generator(req.sampling),
        )
        if req.mode is not RequestMode.DECODE:
            return seq
        assert req.first_token_id is not None
        blocks, n = self._handoff.adopt(req.request_id)
        seq.block_ids, seq.num_computed = blocks, n
        seq.token_ids.append(req.first_token_id)
        seq.num_generated = 1
        # Not filed in the prefix cache: a caller could claim prompt P for KV of P'.
        seq.kv_imported = True
        finish = self._finish_reason(seq, req.first_token_id)
        if finish is None:
            return seq
        self._finish(seq, finish, (), self._pending)
        return None

    def _emit_later(self, req: EngineRequest, out: TokenOutput) -> None:
        self._pending.append((req.on_output, out))
        self._lock.notify_all()

    # The engine thread.

    def _loop(self) -> None:
        self.compiler.configure_thread()
        while True:
            with self._lock:
                while not (self._stopping or self._pending or self.scheduler.has_work()):
                    self._lock.wait()
                if self._stopping:
                    self._cancel_all()
                emits, self._pending = self._pending, []
                batch = None if self._stopping else self._schedule()
            _deliver(emits)
            if self._stopping:
                return
            if batch:
                self._step(batch)
            elif batch is not None:
                with self._lock:  # blocked on blocks held elsewhere: wait for a change
                    if not self._pending:
                        self._lock.wait(timeout=0.05)

    def _schedule(self) -> ScheduledBatch | None:
        try:
            batch = self.scheduler.schedule()
        except Exception as exc:  # a bug: fail everything rather than wedge the loop
            log.exception("engine scheduling failed")
            for seq in list(self._seqs.values()):
                self._finish(seq, FinishReason.ERROR, (), self._pending, error=repr(exc))
            return None
        self.num_preemptions += len(batch.preempted)
        for seq in batch.preempted:  # a reader may be copying its blocks: they were freed
            if seq.req.on_kv_progress is not None:
                error = "preempted while its KV streamed to a reader"
                self._finish(seq, FinishReason.ERROR, (), self._pending, error=error)
        now = time.monotonic()
        for seq in batch.seqs:
            if seq.first_scheduled_s is None:
                seq.first_scheduled_s = now
        self._inflight = set(batch.seqs)
        return batch

    def _step(self, batch: ScheduledBatch) -> None:
        t0 = time.perf_counter()
        tokens: list[_Picked] | None = None
        error: Exception | None = None
        try:
            hook = self._progress_hook(batch)
            logits = self.runner.run(batch) if hook is None else self.runner.run(batch, hook)
            done = self._completing(batch)
            tokens = self._sample(logits, batch, done)
        except Exception as exc:  # the forward itself: every request of the batch fails
            log.exception("engine step failed")
            error = exc
        step_ms = (time.perf_counter() - t0) * 1e3
        emits: list[_Emit] = []
        with self._lock:
            self._inflight = set()
            if error is not None or tokens is None:
                for seq in batch.seqs:
                    self._finish(seq, FinishReason.ERROR, (), emits, error=repr(error))
            else:
                self._postprocess(batch, tokens, step_ms, emits)
        _deliver(emits)

    def _progress_hook(self, batch: ScheduledBatch) -> Callable[[int], None] | None:
        """after_layer for a step with streamed prefills: their progress, per layer."""
        streamed = [(s, n) for s, n in batch.prefills if s.req.on_kv_progress is not None]
        if not streamed:
            return None
        cuda = self.kv.k[0].is_cuda

        def after_layer(i: int) -> None:
            if cuda:  # a reader copies from another stream or process: the layer must be there
                torch.cuda.current_stream(self.kv.k[0].device).synchronize()
            for seq, n in streamed:
                p = KvProgress(tuple(seq.block_ids), seq.num_computed, seq.num_computed + n, i + 1)
                _report(seq, p)

        return after_layer

    @staticmethod
    def _completing(batch: ScheduledBatch) -> list[bool]:
        """Per scheduled seq: does this step reach its last token (so it samples)?"""
        done = [True] * len(batch.decodes)
        done += [s.num_computed + n == len(s.token_ids) for s, n in batch.prefills]
        return done

    @staticmethod
    def _sample(logits: torch.Tensor, batch: ScheduledBatch, done: list[bool]) -> list[_Picked]:
        """Per scheduled seq: its token, None (no token this step) or its sampling error.

        One batched call; if it raises, each row again alone, so a request whose
        sampling fails fails alone (its error returned in its place).
        """
        seqs = batch.seqs
        rows = [i for i, d in enumerate(done) if d]
        out: list[_Picked] = [None] * len(seqs)
        if not rows:
            return out
        try:
            picked = sample(
                logits[rows],
                [seqs[i].req.sampling for i in rows],
                [seqs[i].generator for i in rows],
            )
            for i, t in zip(rows, picked, strict=True):
                out[i] = t
            return out
        except Exception:
            log.exception("batched sampling failed; sampling each request alone")
        for i in rows:
            seq = seqs[i]
            try:
                out[i] = sample(logits[i : i + 1], [seq.req.sampling], [seq.generator])[0]
            except Exception as exc:
                out[i] = exc
        return out

    def _postprocess(
        self, batch: ScheduledBatch, tokens: list[_Picked], step_ms: float, emits: list[_Emit]
    ) -> None:
        chunks = [1] * len(batch.decodes) + [n for _, n in batch.prefills]
        for seq, n, token in zip(batch.seqs, chunks, tokens, strict=True):
            if seq.status is SeqStatus.FINISHED:
                continue
            if seq.aborted:
                self._finish(seq, FinishReason.CANCELLED, (), emits)
                continue
            try:
                self._advance(seq, n, token, step_ms, emits)
            except Exception as exc:  # this request's stop handling: it fails alone
                log.exception("postprocessing failed for %s", seq.request_id)
                self._finish(seq, FinishReason.ERROR, (), emits, error=repr(exc))

    def _advance(
        self, seq: Sequence, n: int, token: _Picked, step_ms: float, emits: list[_Emit]
    ) -> None:
        if isinstance(token, Exception):
            raise token
        if not seq.is_decoding:
            seq.prefill_ms += step_ms
        seq.num_computed += n
        self.scheduler.register_full_blocks(seq)
        if token is not None:
            self._on_token(seq, token, emits)
        elif seq.req.on_kv_progress is not None:  # a chunk done (models without a layer hook)
            c = seq.num_computed
            _report(seq, KvProgress(tuple(seq.block_ids), c, c, self.info.layout.num_layers))

    def _on_token(self, seq: Sequence, token: int, emits: list[_Emit]) -> None:
        seq.token_ids.append(token)
        seq.num_generated += 1
        if seq.mode is RequestMode.PREFILL_ONLY:
            self._finish(seq, FinishReason.PREFILLED, (token,), emits)
            return
        finish = self._finish_reason(seq, token)
        if finish is not None:
            self._finish(seq, finish, (token,), emits)
        else:
            emits.append((seq.req.on_output, self._output(seq, (token,), None)))

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        if token in self._eos and not seq.req.sampling.ignore_eos:
            return FinishReason.STOP
        if seq.num_generated >= seq.req.sampling.max_tokens:
            return FinishReason.LENGTH
        if len(seq.token_ids) >= self.info.max_context:
            return FinishReason.LENGTH
        return None

    def _output(
        self,
        seq: Sequence,
        tokens: tuple[int, ...],
        finish: FinishReason | None,
        error: str | None = None,
    ) -> TokenOutput:
        if seq.reported_first:
            return TokenOutput(seq.request_id, tokens, finish, error)
        seq.reported_first = True
        start = seq.first_scheduled_s if seq.first_scheduled_s is not None else time.monotonic()
        return TokenOutput(
            seq.request_id,
            tokens,
            finish,
            error,
            queue_ms=max(0.0, (start - seq.req.arrival_s) * 1e3),
            prefill_ms=seq.prefill_ms,
            cached_tokens=seq.cached_tokens,
        )

    def _finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        tokens: tuple[int, ...],
        emits: list[_Emit],
        error: str | None = None,
    ) -> None:
        """Ends seq exactly once: frees (or holds) its blocks and queues its last output."""
        if seq.status is SeqStatus.FINISHED:
            return
        self.scheduler.remove(seq)
        if self._seqs.get(seq.request_id) is seq:
            del self._seqs[seq.request_id]
        if reason is FinishReason.PREFILLED:
            self._handoff.hold(seq.request_id, seq.block_ids, seq.num_prompt)
        else:
            self.allocator.free_all(seq.block_ids)
        seq.block_ids = []
        seq.status = SeqStatus.FINISHED
        emits.append((seq.req.on_output, self._output(seq, tokens, reason, error)))

    def _cancel_all(self) -> None:
        for seq in list(self._seqs.values()):
            self._finish(seq, FinishReason.CANCELLED, (), self._pending)


def _report(seq: Sequence, progress: KvProgress) -> None:
    assert seq.req.on_kv_progress is not None
    try:
        seq.req.on_kv_progress(progress)
    except Exception:  # a broken consumer must not fail the step
        log.exception("on_kv_progress failed for %s", seq.request_id)


def _deliver(emits: list[_Emit]) -> None:
    for callback, out in emits:
        try:
            callback(out)
        except Exception:  # a broken consumer must not kill the engine thread
            log.exception("on_output callback failed for %s", out.request_id)
