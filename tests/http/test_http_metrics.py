"""/metrics on the scheduler and the workers: histograms and counters move, KV gauges return to 0."""

from __future__ import annotations

import time

import openai
import pytest

from disagg.metrics import names
from disagg.metrics.scrape import delta, total
from tests.http.support import API_KEY, HttpCluster

N = 3


def _wait_blocks_free(cluster: HttpCluster, timeout_s: float = 5.0) -> dict[str, float]:
    """kv_cache_blocks_used per worker as the scheduler sees it, once all are 0 (heartbeats lag)."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = cluster.metrics()
        used = {dict(lab)["worker"]: v for (n, lab), v in samples.items() if n == names.BLOCKS_USED}
        if len(used) == len(cluster.hosts) and not any(used.values()):
            return used
        if time.monotonic() > deadline:
            raise AssertionError(f"blocks still used: {used}")
        time.sleep(0.1)


def test_scheduler_metrics_move(http_cluster: HttpCluster) -> None:
    client = openai.OpenAI(base_url=http_cluster.base_url + "/v1", api_key=API_KEY, max_retries=0)
    model = client.models.list().data[0].id
    before = http_cluster.metrics()
    tokens = 0
    for i in range(N):
        out = client.completions.create(
            model=model, prompt=f"t{10 + i} t20 t30 t40 t50", max_tokens=8, temperature=0
        )
        assert out.usage is not None
        tokens += out.usage.completion_tokens
    # Prefix-cache queries count every prompt token; these prompts are shorter than a block, so no hits.
    after = http_cluster.metrics()
    for h in (names.TTFT, names.E2E, names.QUEUE, names.PREFILL, names.KV_TRANSFER, names.DECODE):
        assert delta(before, after, h + "_count") == N, h
        assert delta(before, after, h + "_sum") > 0, h
    assert (
        delta(before, after, names.ITL + "_count") == tokens - N
    )  # one gap per token after the first
    assert delta(before, after, names.REQUESTS + "_total") == N
    assert delta(before, after, names.KV_TRANSFER_BYTES + "_total") > 0
    assert delta(before, after, names.PREFIX_QUERIES + "_total") == 5 * N
    assert delta(before, after, names.PREFIX_HITS + "_total") >= 0
    assert (
        delta(before, after, names.SLO_MET + "_total") == N
    )  # the default SLO is loose for a tiny model
    # cumulative buckets: +Inf equals the count
    assert total(after, names.TTFT + "_bucket", le="+Inf") == total(after, names.TTFT + "_count")
    assert total(after, names.RUNNING) == 0
    http_cluster.wait_no_leaks()
    used = _wait_blocks_free(http_cluster)
    assert set(used) == {h.worker_id for h in http_cluster.hosts}
    assert all(total(after, names.BLOCKS_TOTAL, worker=w) == 256 for w in used)


def test_rejections_are_counted(http_cluster: HttpCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    client = openai.OpenAI(base_url=http_cluster.base_url + "/v1", api_key=API_KEY, max_retries=0)
    before = http_cluster.metrics()
    monkeypatch.setattr(http_cluster.app.orchestrator, "_max_inflight", 0)
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="tiny-chat", prompt="t5", max_tokens=2)
    monkeypatch.undo()
    after = http_cluster.metrics()
    assert delta(before, after, names.REJECTED + "_total", reason="overloaded") == 1
    assert delta(before, after, names.REQUESTS + "_total") == 0


def test_worker_metrics(http_cluster: HttpCluster) -> None:
    http_cluster.generate(prompt_token_ids=list(range(3, 40)), max_tokens=3, temperature=0)
    http_cluster.wait_no_leaks()
    for host in http_cluster.decode_hosts:  # KV imports, per transport (auto: NIXL here)
        samples = http_cluster.metrics(host.metrics_port)
        imports, failures = host.kv.metrics.totals()["nixl"]
        assert imports >= 1
        assert total(samples, names.KV_TRANSFER_SECONDS + "_count", transport="nixl") == imports
        assert total(samples, names.KV_TRANSFER_FAILURES + "_total", transport="nixl") == failures
        assert total(samples, names.KV_TRANSFER_RECEIVED_BYTES + "_total", transport="nixl") > 0
    for host in http_cluster.hosts:
        assert host.metrics_port > 0
        samples = http_cluster.metrics(host.metrics_port)
        assert total(samples, names.BLOCKS_TOTAL, worker=host.worker_id) == 256
        assert total(samples, names.BLOCKS_USED, worker=host.worker_id) == 0
        assert total(samples, names.RUNNING) == 0 and total(samples, names.WAITING) == 0
