"""Length-aware routing with real workers (tiny model): where prompts go, seen in the
decision log and in the final response."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from disagg.metastore.embedded import EmbeddedValkey
from tests.cluster import Cluster


@pytest.fixture(scope="module")
def log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("decisions") / "decisions.jsonl"


@pytest.fixture(scope="module")
def cluster(tiny_model: str, valkey: EmbeddedValkey, log_path: Path) -> Iterator[Cluster]:
    with redis.Redis.from_url(valkey.url) as r:
        r.flushall()
    sched = {"local_prefill_tokens": 32, "decision_log": str(log_path)}
    c = Cluster(tiny_model, valkey.url, prefill=2, decode=1, scheduler=sched).start()
    yield c
    c.stop()


def _decision(c: Cluster, path: Path, rid: str) -> dict:  # type: ignore[type-arg]
    c.app.orchestrator.decisions.flush()
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "decision" and rec.get("client_rid") == rid:  # rid: the internal id
            return rec  # type: ignore[no-any-return]
    raise AssertionError(f"no decision for {rid}")


def test_short_prompt_prefilled_on_the_decode_worker(cluster: Cluster, log_path: Path) -> None:
    _, _, last = cluster.generate(
        request_id="short-1", prompt_token_ids=list(range(3, 13)), max_tokens=4, temperature=0
    )
    assert last.prefill_worker == last.decode_worker and last.decode_worker.startswith("decode-")
    assert last.timings.kv_transfer_ms == 0 and last.timings.prefill_ms > 0
    rec = _decision(cluster, log_path, "short-1")
    assert rec["out"]["prefill"] is None and rec["out"]["reason"].startswith("short prompt")
    assert rec["req"]["prompt_tokens"] == 10
    cluster.wait_no_leaks()


def test_long_prompt_prefilled_remotely(cluster: Cluster, log_path: Path) -> None:
    _, _, last = cluster.generate(
        request_id="long-1", prompt_token_ids=list(range(3, 163)), max_tokens=4, temperature=0
    )
    assert last.prefill_worker.startswith("prefill-") and last.timings.kv_transfer_ms > 0
    rec = _decision(cluster, log_path, "long-1")
    assert rec["out"]["prefill"] == last.prefill_worker
    assert rec["out"]["reason"] == "earliest finish"
    cluster.wait_no_leaks()


def _settled(c: Cluster, timeout_s: float = 10.0) -> None:
    """Waits until the scheduler sees every prefill worker idle (heartbeats lag a request:
    a queue still reported after it finished would price the prefix holder out)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        views = [w for w in c.app.orchestrator._registry.snapshot() if w.role == "prefill"]
        if views and all(w.queued_prefill_tokens == 0 and w.running == 0 for w in views):
            return
        time.sleep(0.05)
    raise AssertionError("prefill workers still reported busy")


def test_repeated_long_prefix_goes_to_its_holder(cluster: Cluster, log_path: Path) -> None:
    prefix = [(7 * i) % 500 + 3 for i in range(160)]
    _settled(cluster)
    _, _, first = cluster.generate(
        request_id="pre-0", prompt_token_ids=[*prefix, 11, 12], max_tokens=3, temperature=0
    )
    holder = first.prefill_worker
    assert holder.startswith("prefill-")
    for i in range(1, 4):
        rid = f"pre-{i}"
        _settled(cluster)
        _, _, last = cluster.generate(
            request_id=rid, prompt_token_ids=[*prefix, 20 + i, 30 + i], max_tokens=3, temperature=0
        )
        assert last.prefill_worker == holder
        assert last.usage.cached_prompt_tokens == 160  # the worker's prefix cache served it
        rec = _decision(cluster, log_path, rid)
        assert rec["out"]["reason"] == "prefix hit"
        assert rec["req"]["prefix_hits"][holder] == 160
    cluster.wait_no_leaks()
