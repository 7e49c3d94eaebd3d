"""Summary of a run: the table of `vllm bench serve`, goodput under an SLO, JSON and a plot."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from disagg.bench.backends import RequestResult

SLO_KEYS = ("ttft_ms", "tpot_ms", "e2el_ms")


def parse_slo(text: str) -> dict[str, float]:
    """'ttft_ms=500,tpot_ms=50' (or 'ttft:500 tpot:50') -> {'ttft_ms': 500.0, 'tpot_ms': 50.0}."""
    out: dict[str, float] = {}
    for part in text.replace(",", " ").split():
        key, sep, value = part.replace(":", "=").partition("=")
        key = key if key.endswith("_ms") else key + "_ms"
        if not sep or key not in SLO_KEYS:
            raise ValueError(
                f"bad SLO {part!r}: expected one of {', '.join(SLO_KEYS)} = milliseconds"
            )
        out[key] = float(value)
        if out[key] <= 0:
            raise ValueError(f"SLO {key} must be > 0")
    return out


def meets(r: RequestResult, slo: dict[str, float]) -> bool:
    if not r.success:
        return False
    tpot = r.tpot
    return (
        r.ttft * 1000 <= slo.get("ttft_ms", math.inf)
        and (tpot is None or tpot * 1000 <= slo.get("tpot_ms", math.inf))
        and r.latency * 1000 <= slo.get("e2el_ms", math.inf)
    )


@dataclass
class Stat:
    mean: float = 0.0
    median: float = 0.0
    p99: float = 0.0
    std: float = 0.0

    @staticmethod
    def of_ms(values: list[float]) -> Stat:
        if not values:
            return Stat()
        a = np.asarray(values) * 1000
        return Stat(
            float(a.mean()), float(np.median(a)), float(np.percentile(a, 99)), float(a.std())
        )


@dataclass
class Summary:
    completed: int
    failed: int
    duration_s: float
    total_input: int
    total_output: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    ttft_ms: Stat
    tpot_ms: Stat
    itl_ms: Stat
    e2el_ms: Stat
    request_rate: float
    max_concurrency: int | None
    slo: dict[str, float] = field(default_factory=dict)
    good: int = 0
    goodput: float | None = None
    errors: list[str] = field(default_factory=list)


def summarize(
    results: list[RequestResult],
    duration_s: float,
    request_rate: float,
    max_concurrency: int | None,
    slo: dict[str, float],
) -> Summary:
    ok = [r for r in results if r.success]
    tin, tout = sum(r.prompt_len for r in ok), sum(r.output_tokens for r in ok)
    good = sum(meets(r, slo) for r in ok) if slo else 0
    d = max(duration_s, 1e-9)
    return Summary(
        completed=len(ok),
        failed=len(results) - len(ok),
        duration_s=duration_s,
        total_input=tin,
        total_output=tout,
        request_throughput=len(ok) / d,
        output_throughput=tout / d,
        total_token_throughput=(tin + tout) / d,
        ttft_ms=Stat.of_ms([r.ttft for r in ok]),
        tpot_ms=Stat.of_ms([t for r in ok if (t := r.tpot) is not None]),
        itl_ms=Stat.of_ms([g for r in ok for g in r.itl]),
        e2el_ms=Stat.of_ms([r.latency for r in ok]),
        request_rate=request_rate,
        max_concurrency=max_concurrency,
        slo=slo,
        good=good,
        goodput=good / d if slo else None,
        errors=sorted({r.error for r in results if r.error})[:10],
    )


def _line(label: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{label:<40} {value:<10.2f}"
    return f"{label:<40} {value!s:<10}"


def _section(title: str, char: str = "-") -> str:
    return f"{title:{char}^50}"


def table(s: Summary) -> str:
    rows = [
        _section(" Serving Benchmark Result ", "="),
        _line("Successful requests:", s.completed),
        _line("Failed requests:", s.failed),
    ]
    if s.max_concurrency is not None:
        rows.append(_line("Maximum request concurrency:", s.max_concurrency))
    rows += [
        _line("Request rate configured (RPS):", s.request_rate),
        _line("Benchmark duration (s):", s.duration_s),
        _line("Total input tokens:", s.total_input),
        _line("Total generated tokens:", s.total_output),
        _line("Request throughput (req/s):", s.request_throughput),
    ]
    if s.goodput is not None:
        slo = ", ".join(f"{k}<={v:g}" for k, v in s.slo.items())
        rows += [
            _line("Request goodput (req/s):", s.goodput),
            _line("Requests within SLO:", f"{s.good}/{s.completed} ({slo})"),
        ]
    rows += [
        _line("Output token throughput (tok/s):", s.output_throughput),
        _line("Total Token throughput (tok/s):", s.total_token_throughput),
    ]
    for title, key, stat in (
        ("Time to First Token", "TTFT", s.ttft_ms),
        ("Time per Output Token (excl. 1st token)", "TPOT", s.tpot_ms),
        ("Inter-token Latency", "ITL", s.itl_ms),
        ("End-to-end Latency", "E2EL", s.e2el_ms),
    ):
        rows += [
            _section(title),
            _line(f"Mean {key} (ms):", stat.mean),
            _line(f"Median {key} (ms):", stat.median),
            _line(f"P99 {key} (ms):", stat.p99),
        ]
    rows.append("=" * 50)
    return "\n".join(rows)


def to_json(s: Summary, results: list[RequestResult], config: dict[str, Any]) -> dict[str, Any]:
    summary = asdict(s)
    if math.isinf(summary["request_rate"]):
        summary["request_rate"] = "inf"
    return {
        "config": config,
        "summary": summary,
        "requests": [
            {
                "success": r.success,
                "error": r.error,
                "prompt_len": r.prompt_len,
                "output_tokens": r.output_tokens,
                "ttft_s": r.ttft,
                "latency_s": r.latency,
                "itl_s": r.itl,
            }
            for r in results
        ],
    }


def write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def plot(path: str, results: list[RequestResult], s: Summary) -> None:
    """TTFT and ITL distributions side by side (histograms, mean and p99 marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.success]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, title, values, stat in (
        (axes[0], "TTFT", [r.ttft * 1000 for r in ok], s.ttft_ms),
        (axes[1], "ITL", [g * 1000 for r in ok for g in r.itl], s.itl_ms),
    ):
        if values:
            ax.hist(values, bins=min(50, max(5, len(values) // 4)), color="tab:blue", alpha=0.8)
            ax.axvline(stat.mean, color="tab:orange", label=f"mean {stat.mean:.1f} ms")
            ax.axvline(stat.p99, color="tab:red", linestyle="--", label=f"p99 {stat.p99:.1f} ms")
            ax.legend()
        ax.set_title(f"{title} ({len(values)} samples)")
        ax.set_xlabel("ms")
        ax.set_ylabel("count")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
