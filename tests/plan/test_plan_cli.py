"""`disagg plan` end to end on the shipped H100 profile, as a user runs it."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _plan(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "disagg.cli", "plan", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_plan_recommends_a_layout_from_the_h100_profile(tmp_path) -> None:  # type: ignore[no-untyped-def]
    profile = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "profiles", "h100_*.json")))[0]
    out = tmp_path / "plan.json"
    r = _plan(
        "--profile",
        profile,
        "--gpus",
        "4",
        "--requests",
        "200",
        "--max-sim-gpus",
        "4",
        "--thresholds",
        "0,256",
        "--json",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    assert "recommend" in r.stdout and "prefill" in r.stdout
    rec = json.loads(out.read_text())["recommendations"][0]
    assert rec["gpus"] == 4
    assert rec["prefill"] + rec["decode"] == 4
    assert rec["goodput_rps"] > 0


def test_plan_simulates_one_layout(tmp_path) -> None:  # type: ignore[no-untyped-def]
    profile = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "profiles", "h100_*.json")))[0]
    r = _plan(
        "--profile",
        profile,
        "--simulate",
        "--prefill",
        "1",
        "--decode",
        "1",
        "--rate",
        "5",
        "--requests",
        "100",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["layout"] == "1P:1D" and out["ttft_p99_ms"] > 0 and 0 <= out["attainment"] <= 1


def test_plan_refuses_a_missing_profile() -> None:
    r = _plan("--profile", "/nonexistent.json")
    assert r.returncode == 2 and "disagg plan" in r.stderr
