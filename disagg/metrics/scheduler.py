"""The scheduler's metrics: what one request took, observed where its timings are known.

Lifecycle of a request's ``RequestTrace`` (the orchestrator holds it):
1. ``with metrics.trace(arrival) as trace``: opened when the request arrives.
2. ``trace.event(ev)`` for each event: the first event with tokens gives the
   TTFT, later ones the inter-token latency; the final event (finish_reason
   set) gives e2e, the per-phase times, prefix-cache and SLO counts.
3. Leaving the block without a final event: an exception before any event is
   a rejection (``requests_rejected_total{reason}``), after one an error;
   no exception (the consumer closed the stream) is a cancellation.

Gauges are read at scrape time: running = admitted requests, waiting =
requests queued in the workers' engines, KV blocks per worker from heartbeats.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from disagg.metrics import names
from disagg.metrics.process import gc_pause_observer

_REJECTION_REASONS = {
    "Overloaded": "overloaded",
    "Unavailable": "unavailable",
    "InvalidRequest": "invalid",
}


@dataclass(frozen=True)
class Slo:
    """A request meets the SLO when both hold (TPOT only with more than one token)."""

    ttft_ms: float = 1000.0
    tpot_ms: float = 100.0


def kv_bytes(
    num_blocks: int, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: str
) -> int:
    """Bytes of K and V in num_blocks blocks across every layer."""
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype, 4)
    return num_blocks * num_layers * 2 * block_size * num_kv_heads * head_dim * itemsize


class SchedulerMetrics:
    def __init__(self, slo: Slo | None = None, registry: CollectorRegistry | None = None):
        self.slo = slo or Slo()
        self.registry = registry or CollectorRegistry()
        r = self.registry
        lat, tok = names.LATENCY_BUCKETS, names.TOKEN_BUCKETS
        self.ttft = Histogram(names.TTFT, "Arrival to first token", buckets=lat, registry=r)
        self.itl = Histogram(
            names.ITL, "Time between token events of a stream", buckets=tok, registry=r
        )
        self.e2e = Histogram(names.E2E, "Arrival to the last event", buckets=lat, registry=r)
        self.queue = Histogram(names.QUEUE, "Time queued in the engines", buckets=lat, registry=r)
        self.prefill = Histogram(names.PREFILL, "Prefill forward time", buckets=lat, registry=r)
        self.kv_transfer = Histogram(
            names.KV_TRANSFER, "KV pull time of a handoff", buckets=lat, registry=r
        )
        self.decode = Histogram(
            names.DECODE, "Decode time on the decode worker", buckets=lat, registry=r
        )
        self.kv_transfer_bytes = Counter(names.KV_TRANSFER_BYTES, "KV bytes handed off", registry=r)
        self.requests = Counter(names.REQUESTS, "Finished requests", ["finish_reason"], registry=r)
        self.rejected = Counter(
            names.REJECTED, "Requests refused before their first token", ["reason"], registry=r
        )
        self.prefix_queries = Counter(
            names.PREFIX_QUERIES, "Prompt tokens looked up in the prefix cache", registry=r
        )
        self.prefix_hits = Counter(
            names.PREFIX_HITS, "Prompt tokens served from the prefix cache", registry=r
        )
        self.slo_met = Counter(
            names.SLO_MET, "Finished requests within the TTFT and TPOT SLO", registry=r
        )
        self.migrations = Counter(
            names.MIGRATIONS, "Streams continued on another decode worker", registry=r
        )
        self.verify = Counter(
            names.VERIFY,
            "Served greedy requests re-run collocated and compared, by result",
            ["result"],
            registry=r,
        )
        self.verify_skipped = Counter(
            names.VERIFY_SKIPPED, "Sampled requests not verified, by reason", ["reason"], registry=r
        )
        for result in ("match", "mismatch"):  # both series exist from the start
            self.verify.labels(result)
        self.gc_paused = gc_pause_observer(r)  # (generation, seconds) of one collection

    def bind(
        self,
        running: Callable[[], int],
        infos: Callable[[], list[Any]],
        restarts: Callable[[], dict[str, int]] = dict,
        bad_records: Callable[[], int] = int,
    ) -> None:
        """Registers the scrape-time gauges: running requests, the workers' heartbeats,
        the restarts of supervised services (as last read from Redis) and the malformed
        Redis records the registry skipped."""
        self.registry.register(_FleetCollector(running, infos, restarts, bad_records))

    def trace(self, arrival: float) -> RequestTrace:
        return RequestTrace(self, arrival)

    def migrated(self) -> None:
        self.migrations.inc()

    def verified(self, match: bool) -> None:
        self.verify.labels("match" if match else "mismatch").inc()

    def not_verified(self, reason: str) -> None:
        self.verify_skipped.labels(reason).inc()

    def kv_handed_off(self, nbytes: int) -> None:
        """Counts the KV bytes of a handoff the decode worker has taken."""
        self.kv_transfer_bytes.inc(nbytes)


class RequestTrace:
    def __init__(self, metrics: SchedulerMetrics, arrival: float):
        self._m = metrics
        self._arrival = arrival
        self._first: float | None = None  # monotonic time of the first token event
        self._last: float | None = None  # ... and of the last one
        self._started = False
        self._finished = False

    def __enter__(self) -> RequestTrace:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._finished:
            return
        if exc is None or isinstance(exc, GeneratorExit) or type(exc).__name__ == "CancelledError":
            self._m.requests.labels("cancelled").inc()
        elif not self._started:
            self._m.rejected.labels(_REJECTION_REASONS.get(type(exc).__name__, "error")).inc()
        else:
            self._m.requests.labels("error").inc()

    def event(self, ev: Any) -> None:
        """Observes one GenerationEvent as it leaves the orchestrator."""
        now = time.monotonic()
        self._started = True
        if ev.token_ids:
            if self._last is None:
                self._first = now
                self._m.ttft.observe(now - self._arrival)
            else:
                self._m.itl.observe(now - self._last)
            self._last = now
        if ev.finish_reason is not None and not self._finished:
            self._finished = True
            self._finish(ev, now)

    def _finish(self, ev: Any, now: float) -> None:
        m, t = self._m, ev.timing
        m.e2e.observe(now - self._arrival)
        m.queue.observe(t.queue_ms / 1000)
        for hist, ms in (
            (m.prefill, t.prefill_ms),
            (m.kv_transfer, t.kv_transfer_ms),
            (m.decode, t.decode_ms),
        ):
            if ms > 0:
                hist.observe(ms / 1000)
        m.requests.labels(ev.finish_reason).inc()
        m.prefix_queries.inc(ev.prompt_tokens)
        m.prefix_hits.inc(ev.cached_tokens)
        if self._meets_slo(now, ev.completion_tokens):
            m.slo_met.inc()

    def _meets_slo(self, now: float, completion_tokens: int) -> bool:
        if self._first is None:
            return False
        slo = self._m.slo
        ttft_ok = (self._first - self._arrival) * 1000 <= slo.ttft_ms
        if completion_tokens <= 1:
            return ttft_ok
        tpot_ms = (now - self._first) * 1000 / (completion_tokens - 1)
        return ttft_ok and tpot_ms <= slo.tpot_ms


class _FleetCollector(Collector):
    def __init__(
        self,
        running: Callable[[], int],
        infos: Callable[[], list[Any]],
        restarts: Callable[[], dict[str, int]],
        bad_records: Callable[[], int],
    ):
        self._running = running
        self._infos = infos
        self._restarts = restarts
        self._bad_records = bad_records

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        restarts = CounterMetricFamily(
            names.SERVICE_RESTARTS, "Services restarted by disagg up", labels=["service"]
        )
        for service, n in sorted(self._restarts().items()):
            restarts.add_metric([service], n)
        yield restarts
        yield CounterMetricFamily(
            names.REGISTRY_BAD_RECORDS,
            "Malformed records in Redis the scheduler skipped",
            value=self._bad_records(),
        )
        infos = self._infos()
        yield GaugeMetricFamily(
            names.RUNNING, "Requests admitted by the scheduler", value=self._running()
        )
        yield GaugeMetricFamily(
            names.WAITING,
            "Requests queued in the workers' engines",
            value=sum(i.waiting_requests for i in infos),
        )
        used = GaugeMetricFamily(
            names.BLOCKS_USED, "KV blocks in use (heartbeat)", labels=["worker"]
        )
        total = GaugeMetricFamily(
            names.BLOCKS_TOTAL, "KV blocks in the pool (heartbeat)", labels=["worker"]
        )
        for i in infos:
            used.add_metric([i.worker_id], i.total_blocks - i.free_blocks)
            total.add_metric([i.worker_id], i.total_blocks)
        yield used
        yield total
