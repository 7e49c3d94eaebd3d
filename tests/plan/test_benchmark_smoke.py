"""benchmarks/disagg_vs_colloc.py --quick on the tiny model: it runs and writes every key.

No assertion on speed: the tiny model on shared cores says nothing about disaggregation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEYS = {
    "model",
    "slo",
    "rates",
    "probes",
    "rows",
    "goodput",
    "itl_p99_ratio",
    "itl_p99_ratio_rate",
    "itl_p99_ratio_by_rate",
    "itl_p99_ratio_cond_by_rate",
    "goodput_ratio",
    "goodput_ratio_baseline",
    "itl_p99_ratio_vs_chunked_by_rate",
    "validation",
    "profiles",
}
ROW_KEYS = {
    "layout",
    "rate",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "itl_p50_ms",
    "itl_p99_ms",
    "attainment",
}


def bench(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    script = os.path.join(ROOT, "benchmarks", "disagg_vs_colloc.py")
    r = subprocess.run(
        [sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_quick_run_writes_every_key_and_replays(tiny_model: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    r = bench(
        "--quick",
        "--model",
        tiny_model,
        "--colloc-chunks",
        "64",  # the quick mix's prompts are 100-140 tokens: chunked
        "--json",
        str(out),
        "--plot",
        str(png),
        timeout=360,
    )
    data = json.loads(out.read_text())
    assert KEYS <= set(data)
    names = {"colloc", "colloc-c64", "disagg", "cond"}
    assert {row["layout"] for row in data["rows"]} == names
    assert all(ROW_KEYS <= set(row) for row in data["rows"])
    assert len(data["validation"]) == len(data["rows"])
    assert set(data["goodput"]) == names
    assert data["goodput_ratio_baseline"] in {"colloc", "colloc-c64"}
    assert set(data["itl_p99_ratio_vs_chunked_by_rate"]) == {"colloc-c64"}
    assert png.stat().st_size > 0
    assert "itl_p99_ratio" in r.stdout and "goodput" in r.stdout

    # The stored points replay through the simulator offline, to the same predictions.
    again = bench("--revalidate", str(out), timeout=120)
    for v in data["validation"]:
        line = f"TTFT {v['predicted_ttft_p99_ms']:.0f} vs {v['measured_ttft_p99_ms']:.0f} ms"
        assert line in again.stdout, (line, again.stdout)
    assert "within 20 %" in again.stdout
