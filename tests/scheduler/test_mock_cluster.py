"""Mock workers behind the real scheduler: routing, SLO admission, the decision log and replay."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import redis

from disagg.metastore.embedded import EmbeddedValkey
from disagg.mock.engine import MOCK_VOCAB, mock_stream
from disagg.mock.model import make_mock_model
from disagg.policy.trace import replay
from tests.cluster import Cluster


@pytest.fixture(scope="module")
def mock_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_mock_model(str(tmp_path_factory.mktemp("mock-model")))


@pytest.fixture()
def decision_log(tmp_path: Path) -> Path:
    return tmp_path / "decisions.jsonl"


@pytest.fixture()
def mock_cluster(mock_model: str, valkey: EmbeddedValkey, decision_log: Path) -> Iterator[Cluster]:
    with redis.Redis.from_url(valkey.url) as r:
        r.flushall()
    sched = {"local_prefill_tokens": 32, "decision_log": str(decision_log), "slo_ttft_ms": 5000.0}
    c = Cluster(
        mock_model, valkey.url, prefill=2, decode=2, worker={"mock": True}, scheduler=sched
    ).start()
    yield c
    c.stop()


def _expected(prompt: list[int], n: int) -> list[int]:
    return mock_stream(prompt, n, MOCK_VOCAB)


def test_mock_streams_are_deterministic_local_or_remote(mock_cluster: Cluster) -> None:
    short = list(range(3, 3 + 10))
    long = list(range(3, 3 + 300))
    ids, _, last = mock_cluster.generate(prompt_token_ids=short, max_tokens=8)
    assert ids == _expected(short, 8)
    assert last.prefill_worker == last.decode_worker  # prefilled on the decode worker
    assert last.timings.kv_transfer_ms == 0
    ids, _, last = mock_cluster.generate(prompt_token_ids=long, max_tokens=8)
    assert ids == _expected(long, 8)
    assert last.prefill_worker.startswith("prefill-") and last.timings.kv_transfer_ms > 0
    mock_cluster.wait_no_leaks()


def test_repeated_prefix_goes_to_its_holder(mock_cluster: Cluster) -> None:
    base = [5 + (i % 400) for i in range(512)]
    _, _, first = mock_cluster.generate(prompt_token_ids=[*base, 7, 8], max_tokens=2)
    holders = {first.prefill_worker}
    for tail in range(5):
        _, _, last = mock_cluster.generate(prompt_token_ids=[*base, 9, tail + 3], max_tokens=2)
        holders.add(last.prefill_worker)
        assert last.usage.cached_prompt_tokens == 512
    assert len(holders) == 1
    mock_cluster.wait_no_leaks()


def test_concurrent_load_and_replay(mock_cluster: Cluster, decision_log: Path) -> None:
    prompts = [list(range(3, 3 + 20 + 37 * i)) for i in range(24)]

    def one(p: list[int]) -> list[int]:
        return mock_cluster.generate(prompt_token_ids=p, max_tokens=16)[0]

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(one, prompts))
    assert got == [_expected(p, 16) for p in prompts]
    mock_cluster.wait_no_leaks()
    mock_cluster.app.orchestrator.decisions.flush()
    records = [json.loads(line) for line in decision_log.read_text().splitlines()]
    decisions = [r for r in records if r["kind"] == "decision"]
    assert len(decisions) >= 24
    assert {r["out"]["prefill"] is None for r in decisions} == {True, False}  # both paths
    result = replay(records)
    assert result.decisions == len(decisions) and result.mismatches == []


def test_slo_admission_rejects_at_once(mock_cluster: Cluster) -> None:
    with pytest.raises(grpc.RpcError) as e:
        mock_cluster.generate(
            prompt_token_ids=list(range(3, 3 + 500)), max_tokens=4, ttft_slo_ms=0.5
        )
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "predicted TTFT" in (e.value.details() or "") and "retry after" in (
        e.value.details() or ""
    )
    ids, _, _ = mock_cluster.generate(prompt_token_ids=[3, 4, 5], max_tokens=2, ttft_slo_ms=1000)
    assert len(ids) == 2
    mock_cluster.wait_no_leaks()


def test_no_decode_worker_in_view_is_checked_against_redis_first(
    mock_model: str, valkey: EmbeddedValkey
) -> None:
    """A replica whose last listing predates the workers (just started; refresh every 30 s
    here) re-lists before answering UNAVAILABLE: `disagg up --schedulers 2` printed `ready`
    while one replica's view was still empty, and its first request failed."""
    with redis.Redis.from_url(valkey.url) as r:
        r.flushall()
    c = Cluster(
        mock_model, valkey.url, worker={"mock": True}, scheduler={"registry_refresh_s": 30.0}
    ).start()
    try:
        registry = c.app.orchestrator._registry
        c.run(_clear_view(registry))  # the view of a listing made before any worker registered
        assert not registry.snapshot()
        prompt = list(range(3, 13))
        ids, _, last = c.generate(prompt_token_ids=prompt, max_tokens=4)
        assert ids == _expected(prompt, 4) and last.finish_reason == "length"
        c.wait_no_leaks()
    finally:
        c.stop()


async def _clear_view(registry) -> None:  # type: ignore[no-untyped-def]
    registry.set_infos([])
    registry._listed_at = float("-inf")
