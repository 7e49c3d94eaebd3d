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


def test_quick_run_writes_every_key_and_replays(tiny_model: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "disagg_vs_colloc.py"),
            "--quick",
            "--model",
            tiny_model,
            "--json",
            str(out),
            "--plot",
            str(png),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert KEYS <= set(data)
    assert {row["layout"] for row in data["rows"]} == {"colloc", "disagg", "cond"}
    assert all(ROW_KEYS <= set(row) for row in data["rows"])
    assert len(data["validation"]) == len(data["rows"])
    assert set(data["goodput"]) == {"colloc", "disagg", "cond"}
    assert png.stat().st_size > 0
    assert "itl_p99_ratio" in r.stdout and "goodput" in r.stdout

    # The stored points replay through the simulator offline, to the same predictions.
    again = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "disagg_vs_colloc.py"),
            "--revalidate",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    for v in data["validation"]:
        line = f"TTFT {v['predicted_ttft_p99_ms']:.0f} vs {v['measured_ttft_p99_ms']:.0f} ms"
        assert line in again.stdout, (line, again.stdout)
    assert "within 20 %" in again.stdout
