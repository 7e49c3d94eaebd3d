"""Redis off the request path: a black-holed Redis (accepts, never answers) for 5 s.

1. A cluster (real scheduler, prefill and decode workers, real Valkey) reaches
   Redis only through a proxy the test controls.
2. Long requests are in flight; the proxy turns into a black hole for
   ``OUTAGE_S``: every connection is accepted and read, nothing comes back.
3. Meanwhile new disaggregated requests keep coming (each one's handle is
   published to Redis by its prefill worker, and its state mirrored by the pull
   and the release): every one completes, greedy-equal to ``transformers``, and
   none takes anywhere near a Redis timeout (the data path never waits on it).
4. The proxy forwards again (connections whose bytes it swallowed are reset):
   requests are served at once, the workers' records return, and once the
   writes issued meanwhile have ended nothing leaks -- every pool full, no KV
   record left in Redis (handoffs that ended during the outage have their
   records deleted once it answers again).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import redis

from disagg.engine.testing import GreedyReference, prompt_of
from disagg.metastore.embedded import EmbeddedValkey
from disagg.metastore.keys import KV_PATTERN
from disagg.transfer import mirror
from disagg.v1 import scheduler_pb2
from tests.cluster import Cluster
from tests.security.redis_proxy import RedisProxy

OUTAGE_S = 5.0
SHORT_TOKENS = 8
LONG_TOKENS = 150
# Every Redis timeout of the cluster is raised to REDIS_TIMEOUT_S here (the sockets' through
# the URL, the mirror's write deadline by patching), so a request that waited on any Redis
# call would take that long or more; one that does not takes tens of milliseconds (a few
# hundred on a loaded machine). A fifth of it leaves room for a loaded machine.
REDIS_TIMEOUT_S = 10.0
LATENCY_BOUND_S = REDIS_TIMEOUT_S / 5


@pytest.fixture()
def proxied(
    tiny_model: str, valkey: EmbeddedValkey, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Cluster, RedisProxy]]:
    monkeypatch.setattr(mirror, "MIRROR_TIMEOUT_S", REDIS_TIMEOUT_S)
    with redis.Redis.from_url(valkey.url) as r:
        r.flushall()
    with RedisProxy(valkey.port) as proxy:
        timeouts = f"socket_timeout={REDIS_TIMEOUT_S}&socket_connect_timeout={REDIS_TIMEOUT_S}"
        cluster = Cluster(
            tiny_model,
            proxy.url(query=timeouts),  # URL options win over MetaStore's own
            engine={"compile": False},  # no lazily compiled batch shape stalls a step
            worker={"kv_transport": "grpc"},
        ).start()
        try:
            yield cluster, proxy
        finally:
            cluster.stop()


@dataclass
class Load:
    """What ``_load`` saw: the short requests (latency, prompt, ids, prefill worker),
    the long ones (ids, finish reason) and any error."""

    short: list[tuple[float, list[int], list[int], str]] = field(default_factory=list)
    long: list[tuple[list[int], str]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    @property
    def slowest(self) -> float:
        return max(latency for latency, *_ in self.short)


def _timed(cluster: Cluster, prompt: list[int], n: int) -> tuple[float, list[int], str]:
    start = time.monotonic()
    ids, _, last = cluster.generate(prompt_token_ids=prompt, max_tokens=n, temperature=0)
    return time.monotonic() - start, ids, last.prefill_worker


def _load(
    cluster: Cluster, prompts: list[list[int]], seconds: float, during: Callable[[], None]
) -> Load:
    """Two long requests in flight, then during(), then two clients sending short
    requests back to back for seconds; returns once every request has ended."""
    out = Load()

    def long_request(p: list[int]) -> None:
        try:
            ids, _, last = cluster.generate(
                prompt_token_ids=p, max_tokens=LONG_TOKENS, temperature=0, ignore_eos=True
            )
        except BaseException as e:  # recorded: the caller asserts there is none
            out.errors.append(e)
            return
        out.long.append((ids, last.finish_reason))

    def short_requests(first: int, until: float) -> None:
        i = first
        while time.monotonic() < until:
            p = prompts[i % len(prompts)]
            try:
                latency, ids, worker = _timed(cluster, p, SHORT_TOKENS)
            except BaseException as e:
                out.errors.append(e)
                return
            out.short.append((latency, p, ids, worker))
            i += 2

    longs = [threading.Thread(target=long_request, args=(p,)) for p in prompts[:2]]
    for t in longs:
        t.start()
    time.sleep(0.1)
    during()
    until = time.monotonic() + seconds
    shorts = [threading.Thread(target=short_requests, args=(k, until)) for k in range(2)]
    for t in shorts:
        t.start()
    for t in [*shorts, *longs]:
        t.join(seconds + 60)
    return out


def test_black_holed_redis_is_not_on_the_request_path(
    proxied: tuple[Cluster, RedisProxy], tiny_reference: GreedyReference
) -> None:
    cluster, proxy = proxied
    prompts = [prompt_of(20 + 7 * i, seed=100 + i) for i in range(6)]
    for p in prompts:  # references memoized before anything is timed
        tiny_reference(p, SHORT_TOKENS)
    baseline = _load(cluster, prompts, 2.0, lambda: None)  # the same load, Redis healthy
    assert not baseline.errors, baseline.errors

    outage = _load(cluster, prompts, OUTAGE_S, proxy.blackhole)
    swallowed = proxy.swallowed
    proxy.forward()

    assert not outage.errors, outage.errors
    assert swallowed > 0, "nothing tried Redis during the outage: the test proved nothing"
    assert len(outage.short) >= 10, f"only {len(outage.short)} requests served in {OUTAGE_S}s"
    for _, p, ids, worker in outage.short:
        assert ids == tiny_reference(p, SHORT_TOKENS)
        assert worker.startswith("prefill-")  # a real handoff, with its Redis record
    assert outage.slowest < LATENCY_BOUND_S, (
        f"a request took {outage.slowest:.2f}s during the outage (with Redis healthy, "
        f"{baseline.slowest:.2f}s): it waited on Redis"
    )
    assert [(len(ids), finish) for ids, finish in outage.long] == [(LONG_TOKENS, "length")] * 2

    # Healed: served at once, the workers re-registered, nothing leaked.
    for p in prompts[:2]:
        assert _timed(cluster, p, SHORT_TOKENS)[1] == tiny_reference(p, SHORT_TOKENS)
    deadline = time.monotonic() + 10
    while len(cluster.stub().ListWorkers(scheduler_pb2.ListWorkersRequest()).workers) != 2:
        assert time.monotonic() < deadline, "workers did not re-register"
        time.sleep(0.1)
    for host in cluster.prefill_hosts:  # Redis has caught up: every write issued has ended
        cluster.run(host.servicer.settle(), 3 * REDIS_TIMEOUT_S)  # type: ignore[union-attr]
    cluster.wait_no_leaks(timeout_s=2 * mirror.SWEEP_S + 5.0)  # + failed deletes retried
    with redis.Redis.from_url(proxy.url()) as r:
        assert list(r.scan_iter(KV_PATTERN)) == []
    print(
        f"black hole {OUTAGE_S:g}s: {len(outage.short)} requests served, slowest "
        f"{outage.slowest * 1000:.0f} ms (Redis healthy: {len(baseline.short)} in 2 s, slowest "
        f"{baseline.slowest * 1000:.0f} ms); {swallowed} bytes to Redis swallowed"
    )
