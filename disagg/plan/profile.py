"""Worker cost profiles: what one worker's steps cost, interpolated from measurements.

The format is the engine benchmark's ``--profile-out`` JSON
(``benchmarks/engine.py``): ``prefill`` = ``[{tokens, ms}]``, ``decode`` =
``[{batch, context, step_ms}]``, ``kv_bytes_per_token``. The planner adds
optional keys: ``transfer`` = ``{base_ms, ms_per_mb, blocks_decode}`` (KV
handoff time as a function of bytes; whether it occupies the decode worker),
``decode_context`` (``mean`` or ``max``: the context a mixed decode batch costs
as), ``max_num_seqs``, ``max_num_batched_tokens``,
``gpus_per_worker`` and free-form ``sources`` (where each number came from).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


def interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear y(x) through sorted points, extrapolated along the end segments."""
    if len(xs) == 1:
        return ys[0]
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


@dataclass(frozen=True)
class Profile:
    """Costs of one worker (one engine on ``gpus_per_worker`` accelerators), in ms."""

    prefill: tuple[tuple[int, float], ...]  # (prompt tokens, ms), tokens ascending
    decode: tuple[tuple[int, int, float], ...]  # (batch, context, step ms)
    kv_bytes_per_token: int = 0
    transfer_base_ms: float = 0.0  # fixed cost of one KV handoff
    transfer_ms_per_mb: float = 0.0  # marginal cost per MiB of KV moved
    max_num_seqs: int = 64  # decode batch cap
    max_num_batched_tokens: int = 2048  # tokens per engine step (prefill chunk budget)
    gpus_per_worker: int = 1
    # The decode worker's own compute moves the KV (a CPU pull over gRPC): the handoff
    # delays its next step by the transfer time. False where DMA/RDMA moves it (GPUs).
    transfer_blocks_decode: bool = False
    # Which context a decode step costs as: "mean" (paged kernels, length groups) or
    # "max" (one attention batch padded to its longest context).
    decode_context: str = "mean"
    name: str = ""

    def __post_init__(self) -> None:
        if not self.prefill or not self.decode:
            raise ValueError("a profile needs prefill and decode points")
        if any(ms <= 0 or n <= 0 for n, ms in self.prefill):
            raise ValueError("prefill points must have tokens > 0 and ms > 0")
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0 or self.gpus_per_worker <= 0:
            raise ValueError("max_num_seqs, max_num_batched_tokens, gpus_per_worker must be > 0")
        if self.decode_context not in ("mean", "max"):
            raise ValueError("decode_context must be 'mean' or 'max'")
        # Interpolation grids, built once: the simulator calls these per engine step.
        contexts = sorted({c for _, c, _ in self.decode})
        rows = []
        for c in contexts:
            pts = sorted((b, ms) for b, cc, ms in self.decode if cc == c)
            rows.append(([float(b) for b, _ in pts], [ms for _, ms in pts]))
        object.__setattr__(self, "_ctx", [float(c) for c in contexts])
        object.__setattr__(self, "_rows", rows)
        object.__setattr__(self, "_px", [float(n) for n, _ in self.prefill])
        object.__setattr__(self, "_py", [ms for _, ms in self.prefill])

    def prefill_ms(self, tokens: int) -> float:
        """One engine step prefilling ``tokens`` prompt tokens (0 tokens: 0 ms)."""
        if tokens <= 0:
            return 0.0
        xs, ys = self._px, self._py  # type: ignore[attr-defined]
        floor = min(ys) * tokens / xs[0] if tokens < xs[0] or len(xs) == 1 else 0.0
        return max(interp(xs, ys, tokens), floor, 1e-3)

    def decode_ms(self, batch: int, context: float) -> float:
        """One decode step of ``batch`` sequences of mean ``context`` tokens."""
        if batch <= 0:
            return 0.0
        per_ctx = [interp(bs, ms, batch) for bs, ms in self._rows]  # type: ignore[attr-defined]
        return max(interp(self._ctx, per_ctx, context), 1e-3)  # type: ignore[attr-defined]

    def transfer_ms(self, tokens: int) -> float:
        """Handing off the KV of ``tokens`` prompt tokens from prefill to decode."""
        mb = tokens * self.kv_bytes_per_token / 2**20
        return self.transfer_base_ms + self.transfer_ms_per_mb * mb


def from_json(data: Mapping[str, Any], name: str = "") -> Profile:
    """A Profile from the engine benchmark's profile JSON (plus the planner's optional keys)."""
    transfer = data.get("transfer") or {}
    return Profile(
        prefill=tuple(sorted((int(p["tokens"]), float(p["ms"])) for p in data["prefill"])),
        decode=tuple(
            (int(p["batch"]), int(p["context"]), float(p["step_ms"])) for p in data["decode"]
        ),
        kv_bytes_per_token=int(data.get("kv_bytes_per_token", 0)),
        transfer_base_ms=float(transfer.get("base_ms", 0.0)),
        transfer_ms_per_mb=float(transfer.get("ms_per_mb", 0.0)),
        max_num_seqs=int(data.get("max_num_seqs", 64)),
        max_num_batched_tokens=int(data.get("max_num_batched_tokens", 2048)),
        gpus_per_worker=int(data.get("gpus_per_worker", 1)),
        transfer_blocks_decode=bool(transfer.get("blocks_decode", False)),
        decode_context=str(data.get("decode_context", "mean")),
        name=name or str(data.get("name", "")),
    )


@dataclass(frozen=True)
class Profiles:
    """The profile of each role: a disaggregated prefill worker, decode worker, collocated worker.

    They differ where the hardware given to a role differs (on this 2-core
    machine: one core each when disaggregated, both cores collocated).
    """

    prefill: Profile
    decode: Profile
    colloc: Profile

    @staticmethod
    def same(p: Profile) -> Profiles:
        return Profiles(p, p, p)
