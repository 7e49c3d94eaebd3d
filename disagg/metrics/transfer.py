"""A decode worker's KV imports, per transport: time, bytes, failures (observed per handoff)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from disagg.metrics import names


class TransferMetrics:
    """Registered into a worker's registry (``register``); ``observe`` once per handoff."""

    def __init__(self) -> None:
        self._seconds = Histogram(
            names.KV_TRANSFER_SECONDS,
            "KV import time on the decode worker: reserve until verified (or failed)",
            ["transport"],
            buckets=names.LATENCY_BUCKETS,
            registry=None,
        )
        self._bytes = Counter(
            names.KV_TRANSFER_RECEIVED_BYTES,
            "KV bytes imported and verified",
            ["transport"],
            registry=None,
        )
        self._failures = Counter(
            names.KV_TRANSFER_FAILURES,
            "KV imports that failed (the request was prefilled locally instead)",
            ["transport"],
            registry=None,
        )
        self._totals: dict[str, tuple[int, int]] = {}

    def totals(self) -> dict[str, tuple[int, int]]:
        """transport -> (imports, failures) so far (logs, tests)."""
        return dict(self._totals)

    def register(self, registry: CollectorRegistry) -> None:
        for metric in (self._seconds, self._bytes, self._failures):
            registry.register(metric)

    def observe(self, transport: str, ok: bool, seconds: float, nbytes: int) -> None:
        n, failed = self._totals.get(transport, (0, 0))
        self._totals[transport] = (n + 1, failed + (not ok))
        self._seconds.labels(transport).observe(seconds)
        if ok:
            self._bytes.labels(transport).inc(nbytes)
        else:
            self._failures.labels(transport).inc()
