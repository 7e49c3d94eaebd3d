"""Online correctness checks on a cluster whose KV path is broken on purpose.

DISAGG_TEST_FAULT_KV=shift_block (read by each decode worker's receiver when it
starts) overwrites the first imported block with the second: a block id off by
one. Every disaggregated request of two blocks or more then decodes from wrong
KV. The scheduler's sampled re-runs (--verify-fraction 1.0) must see it in
disagg:verify_total{result="mismatch"} and log both sequences; `disagg verify`
must exit 1. The healthy cluster's side (50 matches, exit 0) is in test_up_clients.py.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from disagg.client import Client
from disagg.engine.testing import GreedyReference
from tests.cluster import Cluster

REPO = Path(__file__).resolve().parents[2]
PROMPTS = [list(range(5 + i, 45 + i)) for i in range(6)]  # 40 tokens: three blocks each


def _verify_count(cluster: Cluster, result: str) -> float:
    value = cluster.app.metrics.registry.get_sample_value("disagg:verify_total", {"result": result})
    return value or 0.0


def _disagg_verify(address: str, prompts: Path) -> subprocess.CompletedProcess[str]:
    argv = ["verify", "--address", address, "--prompts", str(prompts), "--max-tokens", "12"]
    return subprocess.run(
        [sys.executable, "-m", "disagg.cli", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _prompts_file(tmp_path: Path) -> Path:
    f = tmp_path / "prompts.jsonl"
    f.write_text("".join(f'{{"prompt_token_ids": {p}}}\n' for p in PROMPTS))
    return f


@pytest.fixture()
def faulty(own_cluster: Any, monkeypatch: pytest.MonkeyPatch) -> Cluster:
    monkeypatch.setenv("DISAGG_TEST_FAULT_KV", "shift_block")
    cluster: Cluster = own_cluster(scheduler={"verify_fraction": 1.0})
    monkeypatch.delenv("DISAGG_TEST_FAULT_KV")  # read once, at worker start
    return cluster


def test_a_kv_fault_shows_as_mismatches(
    faulty: Cluster,
    tiny_reference: GreedyReference,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="services.scheduler.verify")
    served = []
    with Client(faulty.address) as client:
        for p in PROMPTS:
            served.append(client.complete(prompt_token_ids=p, max_tokens=12, temperature=0))
    # The fault is real: what the clients got is not the model's greedy output.
    wrong = [
        c
        for c, p in zip(served, PROMPTS, strict=True)
        if list(c.token_ids) != tiny_reference(p, 12)
    ]
    assert wrong, "the injected fault changed nothing: the test proves nothing"
    faulty.run(faulty.app.orchestrator.verifier.settle(), timeout_s=120)
    assert _verify_count(faulty, "mismatch") == len(wrong)
    assert _verify_count(faulty, "match") == len(PROMPTS) - len(wrong)
    lines = [r.getMessage() for r in caplog.records if "verify mismatch" in r.getMessage()]
    assert len(lines) == len(wrong)
    c = wrong[0]
    line = next(m for m in lines if c.request_id in m)
    assert f"served={list(c.token_ids)}" in line
    i = PROMPTS[served.index(c)]
    assert f"collocated={tiny_reference(i, 12)}" in line  # the re-run is the right answer

    result = _disagg_verify(faulty.address, _prompts_file(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "MISMATCH" in result.stdout and f"{len(PROMPTS)} prompts" in result.stdout
    faulty.wait_no_leaks()


def test_verify_flag_on_a_healthy_cluster(
    own_cluster: Any, tiny_reference: GreedyReference, tmp_path: Path
) -> None:
    """verify: true without sampling: checked, a match, and the stream is what it would be."""
    cluster: Cluster = own_cluster()
    with Client(cluster.address) as client:
        plain = client.complete(prompt_token_ids=PROMPTS[0], max_tokens=12, temperature=0)
        checked = client.complete(
            prompt_token_ids=PROMPTS[0], max_tokens=12, temperature=0, verify=True
        )
    assert checked.token_ids == plain.token_ids == tuple(tiny_reference(PROMPTS[0], 12))
    assert checked.text == plain.text and checked.finish_reason == plain.finish_reason
    cluster.run(cluster.app.orchestrator.verifier.settle(), timeout_s=60)
    assert _verify_count(cluster, "match") == 1  # the plain request was not sampled
    assert _verify_count(cluster, "mismatch") == 0
    result = _disagg_verify(cluster.address, _prompts_file(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"verified {len(PROMPTS)} prompts: 0 mismatches" in result.stdout
    cluster.wait_no_leaks()
