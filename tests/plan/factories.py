"""Constructed worker profiles and workloads for the planner tests."""

from __future__ import annotations

from disagg.plan.profile import Profile, Profiles
from disagg.plan.workload import LengthClass


def profile(
    prefill_ms_per_token: float = 0.02,
    prefill_base_ms: float = 5.0,
    step_ms: float = 10.0,
    step_ms_per_seq: float = 0.2,
    chunk: int = 8192,
    max_num_seqs: int = 256,
) -> Profile:
    """Linear prefill (base + per token) and decode (base + per sequence, flat in context)."""
    return Profile(
        prefill=tuple((n, prefill_base_ms + prefill_ms_per_token * n) for n in (100, 1000, 8000)),
        decode=tuple(
            (b, c, step_ms + step_ms_per_seq * b) for c in (128, 4096) for b in (1, 64, 256)
        ),
        kv_bytes_per_token=1024,
        transfer_ms_per_mb=0.1,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=chunk,
    )


def same(p: Profile) -> Profiles:
    return Profiles.same(p)


def mix(prompt: tuple[int, int], output: tuple[int, int]) -> tuple[LengthClass, ...]:
    return (LengthClass(1.0, prompt, output),)
