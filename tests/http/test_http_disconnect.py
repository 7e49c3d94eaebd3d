"""A client that goes away mid-stream cancels the request on every worker: all KV freed within 1 s."""

from __future__ import annotations

import http.client
import json
import time

from disagg.metrics import names
from disagg.metrics.scrape import delta
from tests.http.support import API_KEY, HttpCluster


def _running(cluster: HttpCluster) -> int:
    return sum(h.engine.stats().running for h in cluster.decode_hosts if h.engine is not None)


def test_disconnect_frees_kv(http_cluster: HttpCluster) -> None:
    before = http_cluster.metrics()
    conn = http.client.HTTPConnection("127.0.0.1", http_cluster.app.http_port, timeout=30)
    body = {
        "model": "tiny-chat",
        "prompt": " ".join(f"t{i}" for i in range(10, 50)),
        "max_tokens": 200,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps(body),
        {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    resp = conn.getresponse()
    assert resp.status == 200
    chunks = 0
    while chunks < 3:  # the first tokens, then the decode worker is mid-generation
        line = resp.readline()
        if line.startswith(b"data: {"):
            chunks += 1
    assert _running(http_cluster) == 1
    conn.sock.close()  # type: ignore[union-attr]
    conn.close()
    t0 = time.monotonic()
    http_cluster.wait_no_leaks(timeout_s=1.0)
    assert time.monotonic() - t0 <= 1.0
    deadline = time.monotonic() + 1.0
    while True:  # the cancellation is counted as such (not as a finished request)
        after = http_cluster.metrics()
        if (
            delta(before, after, names.REQUESTS + "_total", finish_reason="cancelled") == 1
            or time.monotonic() > deadline
        ):
            break
        time.sleep(0.02)
    assert delta(before, after, names.REQUESTS + "_total", finish_reason="cancelled") == 1
    assert delta(before, after, names.REQUESTS + "_total", finish_reason="length") == 0
