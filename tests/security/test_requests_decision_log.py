"""A full disk under --decision-log fails no request (issue 14, part of hole 8).

A real cluster whose scheduler writes its decision log to /dev/full (every
write ENOSPC), flushing after every record so each request's own decision
write fails on its path: eight concurrent requests through real gRPC complete
greedy-equal; the failures are counted (on the scheduler's /metrics, read over
HTTP) and logged once, not once per request; nothing leaks.
"""

from __future__ import annotations

import logging
import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from disagg.engine.testing import GreedyReference, prompt_of
from disagg.metastore.embedded import EmbeddedValkey
from services.scheduler import decisions
from tests.cluster import Cluster

N = 8
N_NEW = 6


def test_full_disk_under_the_decision_log_fails_no_request(
    tiny_model: str,
    valkey: EmbeddedValkey,
    tiny_reference: GreedyReference,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(decisions, "FLUSH_EVERY_S", 0.0)  # every record hits the disk at once
    caplog.set_level(logging.WARNING, logger="disagg.decisions")
    with redis.Redis.from_url(valkey.url) as r:
        r.flushall()
    sched = {"decision_log": "/dev/full", "http_port": 0}
    cluster = Cluster(tiny_model, valkey.url, scheduler=sched).start()
    try:
        prompts = [prompt_of(5 + i, seed=400 + i) for i in range(N)]

        def one(p: list[int]) -> tuple[list[int], str]:
            ids, _, last = cluster.generate(prompt_token_ids=p, max_tokens=N_NEW, temperature=0)
            return ids, last.finish_reason

        with ThreadPoolExecutor(N) as pool:
            results = list(pool.map(one, prompts))
        for p, (ids, finish) in zip(prompts, results, strict=True):
            assert finish in ("stop", "length") and ids == tiny_reference(p, N_NEW)
        cluster.wait_no_leaks()

        log = cluster.app.orchestrator.decisions
        assert log.errors >= 1 + N  # the startup write, then each request's decision
        url = f"http://127.0.0.1:{cluster.app.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        m = re.search(r"^disagg:decision_log_errors_total (\S+)$", text, re.MULTILINE)
        assert m and float(m.group(1)) == log.errors, text
        warned = [r for r in caplog.records if r.name == "disagg.decisions"]
        assert len(warned) == 1 and "No space left" in warned[0].getMessage()  # rate-limited
    finally:
        cluster.stop()
