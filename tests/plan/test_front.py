"""Sizing the scheduler front from measured CPU per request and per token."""

from __future__ import annotations

import glob
import json
import os

import pytest

from disagg.plan.front import FrontCost, front_cost
from tests.plan.test_plan_cli import ROOT, _plan


def test_replicas_follow_cpu_and_keep_headroom() -> None:
    cost = FrontCost(request_cpu_ms=1.0, token_cpu_us=10.0, core_budget=0.5, min_replicas=2)
    assert cost.cores(1000, 100_000) == pytest.approx(1.0 + 1.0)
    assert cost.replicas(1000, 100_000) == 4  # 2 cores at half a core each
    assert cost.replicas(10, 100) == 2  # never fewer than min_replicas
    assert cost.replicas(1001, 100_000) == 5  # rounded up, not to the nearest
    with pytest.raises(ValueError):
        FrontCost(1.0, 1.0, core_budget=0)


def test_front_cost_reads_the_benchmark_json_and_a_profile_key() -> None:
    bench = {"runs": [{"request_cpu_ms": 0.9, "token_cpu_us": 12.5, "workers": 16}]}
    assert front_cost(bench, "b.json") == FrontCost(0.9, 12.5, source="b.json")
    assert front_cost({"request_cpu_ms": 2, "token_cpu_us": 3}, "p").token_cpu_us == 3.0


def test_plan_reports_the_scheduler_replicas(tmp_path) -> None:  # type: ignore[no-untyped-def]
    profile = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "profiles", "h100_*.json")))[0]
    cost = tmp_path / "sched.json"
    cost.write_text(json.dumps({"runs": [{"request_cpu_ms": 1.0, "token_cpu_us": 20.0}]}))
    out = tmp_path / "plan.json"
    r = _plan(
        "--profile", profile, "--gpus", "4", "--requests", "200", "--max-sim-gpus", "4",
        "--thresholds", "0", "--scheduler-cost", str(cost), "--json", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    front = json.loads(out.read_text())["recommendations"][0]["front"]
    want = FrontCost(1.0, 20.0).replicas(front["requests_per_s"], front["tokens_per_s"])
    assert front["schedulers"] == want >= 2
    assert front["tokens_per_s"] > front["requests_per_s"] > 0
    assert f"front: {want} scheduler replicas" in r.stdout
