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


def test_plan_reports_bad_traces_and_a_missing_slo_without_a_traceback(tmp_path) -> None:  # type: ignore[no-untyped-def]
    profile = os.path.join(ROOT, "benchmarks", "results", "profile-smollm2-cpu2.json")
    r = _plan("--profile", profile, "--gpus", "2")  # this profile carries no default SLO
    assert r.returncode == 2 and "--slo-ttft-ms" in r.stderr and "Traceback" not in r.stderr
    slo = ("--slo-ttft-ms", "2000", "--slo-tpot-ms", "200")
    r = _plan("--profile", profile, *slo, "--trace", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and "missing.jsonl" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_len": 10, "output_len": 5, "timestamp": 0}\nnot json\n')
    r = _plan("--profile", profile, *slo, "--trace", str(bad))
    assert r.returncode == 2 and "bad.jsonl:2" in r.stderr and "Traceback" not in r.stderr


def test_plan_says_when_the_rate_never_binds(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An SLO so loose that every request may arrive at once: no finite rate is reported
    (the search's upper bound used to leak out as 8388608 req/s)."""
    profile = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "profiles", "h100_*.json")))[0]
    out = tmp_path / "plan.json"
    loose = ("--slo-ttft-ms", "1e9", "--slo-tpot-ms", "1e9", "--thresholds", "0")
    r = _plan("--profile", profile, "--gpus", "4", "--max-sim-gpus", "4", "--requests", "50",
              *loose, "--json", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "unbounded" in r.stdout and "8388608" not in r.stdout
    rec = json.loads(out.read_text())["recommendations"][0]
    assert rec["unbounded"] is True and rec["goodput_rps"] is None


def test_a_closed_stdout_is_not_an_error() -> None:
    """`disagg ... | head`: the reader goes away; the command ends quietly, exit 0."""
    profile = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "profiles", "h100_*.json")))[0]
    r, w = os.pipe()
    os.close(r)  # every write to w now fails with EPIPE
    args = ["--profile", profile, "--simulate", "--requests", "50"]
    p = subprocess.run(
        [sys.executable, "-m", "disagg.cli", "plan", *args],
        cwd=ROOT,
        stdout=w,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    os.close(w)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
