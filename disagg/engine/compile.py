"""The compiled step of the engine's own models: what is compiled, for which shapes, when.

- Compiled (``torch.compile``, inductor: C++ on CPU, Triton on CUDA): the
  per-layer work between two attentions (``models.llama.first`` / ``mid`` /
  ``head``: norms, projections, RoPE, MLP -- one graph reused by every
  layer) and the fused decode attention over the pool
  (``paged_attention.fused_decode``, symbolic in batch, context and pool
  size). Not the sampler: compiled, its filtered draw ran 12 % faster but
  cost a 6 s compile per new 0/1-specialised row count (ADR 0006).
- Decode buckets: a step of decodes only is padded to the next bucket (1, 2,
  4, 8, then multiples of 8 up to ``max_num_seqs``), so its shapes are
  static: one graph per bucket, the CPU counterpart of CUDA-graph capture
  sizes (on CUDA the buckets run as CUDA graphs: mode ``reduce-overhead``).
- Prefill and mixed steps: one graph symbolic in the token count (their
  shapes change with every chunk).
- When: ``warmup`` (``LLMEngine.start``) compiles decode buckets smallest
  first for up to ``EngineConfig.compile_warmup_s``; a bucket not compiled
  by then compiles on its first use. Inductor caches what it built on disk,
  so a later process loads a bucket in well under a second.
- A failing compile runs that piece eagerly (``suppress_errors``), logged by
  dynamo, instead of failing the step. Without a C++ compiler: eager.

Measured costs and gains: docs/adr/0006-native-model-path.md.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from typing import Any

import torch

from disagg.engine.models.llama import StepFns, first, head, mid
from disagg.engine.paged_attention import fused_decode, gathered_decode

log = logging.getLogger(__name__)


def decode_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then multiples of 8, up to (and including) max_num_seqs."""
    small = [b for b in (1, 2, 4) if b < max_num_seqs]
    return tuple(small + list(range(8, max_num_seqs, 8)) + [max_num_seqs])


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n (n itself beyond the largest)."""
    for b in buckets:
        if b >= n:
            return b
    return n


def compiler_unavailable(device: torch.device) -> str | None:
    """None when inductor can compile for device; else why not."""
    if device.type not in ("cpu", "cuda"):
        return f"device type {device.type!r}"
    if device.type == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        return "no C++ compiler (g++) on PATH"
    return None


def _configure() -> None:
    """Dynamo's settings for the engine's graphs. Dynamo's config is per thread:
    every thread that compiles or runs the step applies them (``configure_thread``)."""
    import torch._dynamo.config as dynamo

    # One graph per decode bucket per piece; the default limit (8) would silently
    # send the larger buckets back to eager.
    dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 1024)
    dynamo.suppress_errors = True  # a compile failure runs that piece eagerly


# Sizes that vary step to step are marked *unbacked*: a graph built at size 1
# then serves every size (a merely dynamic dim is specialised at 0 and 1, so a
# batch of 1 or a one-block table would each compile again, mid-serving).
_unbacked = torch._dynamo.decorators.mark_unbacked


def _symbolic_rows(compiled: Callable[..., Any], args: tuple[int, ...]) -> Callable[..., Any]:
    """compiled, with dim 0 (tokens) of the listed tensor arguments symbolic."""

    def run(*a: Any) -> Any:
        for i in args:
            if a[i] is not None:
                _unbacked(a[i], 0)
        return compiled(*a)

    return run


def _symbolic_decode(compiled: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The compiled decode attention, batch / table width / pool size symbolic.

    Head counts and head_dim stay static (one graph per model shape): with
    every size symbolic (``dynamic=True``) inductor indexed with symbolic
    strides in the inner loops and the kernel ran ~6x slower (ADR 0006).
    """

    def run(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        table: torch.Tensor,
        lens: torch.Tensor,
        scale: float,
        window: int,
    ) -> torch.Tensor:
        for t in (q, table, lens):
            _unbacked(t, 0)
        _unbacked(table, 1)
        torch._dynamo.maybe_mark_dynamic(k_cache, 0)  # the pool's size: one graph for every engine
        torch._dynamo.maybe_mark_dynamic(v_cache, 0)
        return compiled(q, k_cache, v_cache, table, lens, scale, window)

    return run


# Distinct code objects: dynamo caches graphs per code object, so the static
# decode graphs and the symbolic prefill graphs never share one cache.
def _first_decode(*args: Any) -> Any:
    return first(*args)


def _mid_decode(*args: Any) -> Any:
    return mid(*args)


def _head_decode(*args: Any) -> Any:
    return head(*args)


class StepCompiler:
    """The pieces each step runs: compiled per decode bucket / for prefill, or eager."""

    def __init__(self, enabled: bool, device: torch.device, max_num_seqs: int) -> None:
        self.buckets = decode_buckets(max_num_seqs)
        why_not = compiler_unavailable(device) if enabled else "disabled"
        self.enabled = why_not is None
        if enabled and why_not is not None:
            log.warning("compiled step unavailable (%s): running eagerly", why_not)
        self.prefill_fns = self._decode = StepFns()
        self.decode_attention: Callable[..., torch.Tensor] = gathered_decode
        self.compiled_s: dict[int, float] = {}  # bucket -> seconds of its first (compiling) step
        self.cuda_graphs = self.enabled and device.type == "cuda"  # decode buckets as CUDA graphs
        if self.enabled:
            self._compile(device)

    def _compile(self, device: torch.device) -> None:
        _configure()
        mode = "reduce-overhead" if self.cuda_graphs else None
        self._decode = StepFns(
            first=torch.compile(_first_decode, dynamic=False, mode=mode),
            mid=torch.compile(_mid_decode, dynamic=False, mode=mode),
            head=torch.compile(_head_decode, dynamic=False, mode=mode),
        )
        self.prefill_fns = StepFns(
            first=_symbolic_rows(torch.compile(first), (0, 1)),
            mid=_symbolic_rows(torch.compile(mid), (0, 1, 2, 3)),
            head=_symbolic_rows(torch.compile(head), (0, 1, 5)),
        )
        self.decode_attention = _symbolic_decode(torch.compile(fused_decode))

    def configure_thread(self) -> None:
        """The compile settings on the calling thread (warm-up's, the step thread)."""
        if self.enabled:
            _configure()

    def decode_fns(self, n: int) -> tuple[StepFns, int]:
        """(pieces, padded row count) for a step of n decodes."""
        if not self.enabled:
            return self._decode, n
        return self._decode, bucket_for(n, self.buckets)

    def warmup(self, run_bucket: Callable[[int], None], budget_s: float) -> float:
        """Runs one step of each decode bucket, smallest first, while budget_s lasts; seconds."""
        t0 = time.perf_counter()
        for b in self.buckets if self.enabled else ():
            if time.perf_counter() - t0 >= budget_s:
                break
            t = time.perf_counter()
            run_bucket(b)
            self.compiled_s.setdefault(b, time.perf_counter() - t)
        spent = time.perf_counter() - t0
        if self.compiled_s:
            log.info("compiled decode buckets %s in %.1f s", sorted(self.compiled_s), spent)
        return spent
