"""The engine's contract with the services: value objects and the Engine protocol.

A worker owns one Engine. The engine runs its step loop (schedule -> run ->
postprocess) on a background thread; services talk to it only through the
methods below, all thread-safe, and receive tokens through each request's
``on_output`` callback (called on the engine thread: it must not block).

Lifecycle of a request inside an engine:

1. ``submit(req)``: queued (WAITING). Its prompt KV is either computed here
   (modes GENERATE and PREFILL_ONLY) or was imported before it
   (``reserve_import`` + ``write_kv``; mode DECODE, ``req.first_token_id`` set).
2. Scheduled into a step when blocks are available: prefill chunks up to the
   token budget, or one decode token per running request per step.
3. Each step's new tokens reach ``on_output``. A request finishes on EOS
   (unless ignore_eos), on ``max_tokens``, or on ``abort``.
4. On finish its blocks are freed -- except PREFILL_ONLY, whose blocks are
   *held* under the request id until ``release`` (after a KV pull or on
   cancel). Every block is freed exactly once.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS sampled
    LENGTH = "length"  # max_tokens reached (or the context is full)
    CANCELLED = "cancelled"  # abort() called
    ERROR = "error"  # the engine failed this request
    PREFILLED = "prefilled"  # PREFILL_ONLY: first token sampled, KV held


class RequestMode(str, enum.Enum):
    GENERATE = "generate"  # local prefill, then decode (collocated)
    PREFILL_ONLY = "prefill_only"  # prefill + first token, then hold the KV
    DECODE = "decode"  # prompt KV already imported; continue from first_token_id


MAX_TOP_K = 1 << 20  # above any vocabulary; larger values are rejected, not clamped
MIN_TEMPERATURE = 1e-5  # a finite temperature below it is sampled greedily, not refused


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. Validated by the scheduler, and again here: a worker
    builds these from the wire and must not trust its caller to have checked
    (NaN/inf would reach the sampler as NaN probabilities)."""

    max_tokens: int = 16  # tokens to generate, counting the first one
    temperature: float = 1.0  # 0 = greedy; (0, MIN_TEMPERATURE) is greedy too
    top_p: float = 1.0  # nucleus mass, (0, 1]
    top_k: int = 0  # 0 = disabled
    seed: int | None = None  # same seed -> same tokens
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise ValueError("max_tokens must be > 0")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError("temperature must be finite and >= 0")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be in [0, {MAX_TOP_K}]")


@dataclass(frozen=True)
class KvLayout:
    """Shape of one block: per layer, K and V each [block_size, num_kv_heads, head_dim]."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name: "float32", "bfloat16", "float16"
    block_size: int

    @property
    def bytes_per_block_per_layer(self) -> int:
        """Bytes of K (or of V) for one block of one layer."""
        itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]
        return self.block_size * self.num_kv_heads * self.head_dim * itemsize


@dataclass(frozen=True)
class ModelInfo:
    name: str  # served model name
    path: str  # local directory it was loaded from
    vocab_size: int
    max_context: int  # max_position_embeddings
    eos_token_ids: tuple[int, ...]
    layout: KvLayout


@dataclass(frozen=True)
class TokenOutput:
    """New tokens of one request from one step; ``finish`` set on the last one."""

    request_id: str
    token_ids: tuple[int, ...]
    finish: FinishReason | None = None
    error: str | None = None  # set with FinishReason.ERROR
    # Timings, milliseconds, set on the first output of a request:
    queue_ms: float | None = None  # submit -> first scheduled
    prefill_ms: float | None = None  # its prefill forward passes (0 for DECODE)
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass(frozen=True)
class KvProgress:
    """How much of a running PREFILL_ONLY request's KV is in the pool (its
    ``on_kv_progress``): tokens [0, computed) in every layer, tokens [computed, upto)
    in layers [0, layers) (the chunk in flight). block_ids: its blocks so far, in
    prompt order; they stay its own until it finishes or fails."""

    block_ids: tuple[int, ...]
    computed: int
    upto: int
    layers: int


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    on_output: Callable[[TokenOutput], None]
    mode: RequestMode = RequestMode.GENERATE
    # DECODE only: the first generated token (sampled by the prefill worker);
    # the KV of prompt_token_ids must already be imported under request_id.
    first_token_id: int | None = None
    arrival_s: float = field(default=0.0)  # time.monotonic() at submit (set by the engine)
    # Starts the prefix-cache hash chain (kvpool.hashing): requests of different salts
    # (tenants) never share cached blocks. Empty: unsalted.
    cache_salt: bytes = b""
    # PREFILL_ONLY: called on the engine thread as each layer of each chunk lands
    # in the pool (per step for models without a per-layer hook); must be cheap
    # and must not raise. Set, the request is never preempted: it fails instead
    # (a reader may be copying its blocks).
    on_kv_progress: Callable[[KvProgress], None] | None = None


@dataclass(frozen=True)
class EngineStats:
    free_blocks: int
    total_blocks: int
    running: int  # requests in the decode batch
    waiting: int  # requests waiting to be scheduled
    queued_prefill_tokens: int  # uncomputed prompt tokens of waiting/prefilling requests
    held: int  # PREFILL_ONLY requests whose KV is held for a pull


class Engine(Protocol):
    """What the services use. Implemented by disagg.engine.engine.LLMEngine."""

    info: ModelInfo
    tokenizer: object  # a transformers PreTrainedTokenizerBase

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def submit(self, req: EngineRequest) -> None: ...
    def abort(self, request_id: str) -> None:
        """Cancels a waiting/running request (its on_output gets CANCELLED) or
        releases held/imported KV. Idempotent; unknown ids are ignored."""

    def stats(self) -> EngineStats: ...
    def cached_prefix(self) -> tuple[int, list[bytes]]:
        """(version, content hashes of every block in the prefix cache); the version
        changes whenever the set does, so a publisher can skip unchanged sets."""

    # KV transfer: export side (prefill worker).
    def held_blocks(self, request_id: str) -> tuple[list[int], int] | None:
        """(block_ids, num_tokens) of a PREFILL_ONLY request's held KV, or None."""

    def read_kv(self, block_ids: list[int], layer: int) -> tuple[bytes, bytes]:
        """Raw K and V bytes of these blocks of one layer, [n, block_size, kv_heads, head_dim]."""

    def release(self, request_id: str) -> bool:
        """Frees held KV (export side) or imported-but-unsubmitted KV (import side).
        Returns False when nothing was held."""

    # KV transfer: import side (decode worker).
    def reserve_import(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Allocates blocks for num_tokens of prompt KV under request_id;
        None when the pool cannot hold them now."""

    def write_kv(self, block_ids: list[int], layer: int, k: bytes, v: bytes) -> None:
        """Writes raw K and V (same shape as read_kv) into these blocks of one layer."""
