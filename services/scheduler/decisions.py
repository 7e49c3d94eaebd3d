"""The decision log: every routing decision, structured, with its inputs.

Each decision is one ``decision`` log line (key=value, for people) and, when a
path is configured, one JSON line of ``disagg.policy.trace`` records (for
``disagg replay``): the worker views and cost models are written when they
change, each decision with the loads and request inputs it was made from.
Both carry the request's internal id; the client's own id, when it sent one,
rides along quoted (``client_request_id`` / ``client_rid``), never as the key.

The file is best effort, never on a request's critical path:

1. Records are buffered and flushed when the last flush is ``FLUSH_EVERY_S``
   old (and on ``flush``/``close``), so a slow disk costs a request nothing
   but a buffered write.
2. A write or flush that fails (a full disk: ENOSPC, EDQUOT, EIO ...) loses
   the buffered records; the failure is counted (``errors``, and
   ``disagg:decision_log_errors_total`` when a metrics registry is given),
   logged at most once per ``WARN_EVERY_S``, and the file is reopened at the
   next record. It never raises into routing: the request is served.
"""

from __future__ import annotations

import errno
import json
import logging
import time
from collections.abc import Mapping
from typing import IO, Any

from prometheus_client import CollectorRegistry, Counter

from disagg.metrics.names import PREFIX
from disagg.policy.cost import CostModel
from disagg.policy.routing import Decision, Load, PolicyConfig, RouteRequest, Snapshot
from disagg.policy.trace import (
    config_record,
    cost_record,
    decision_record,
    outcome,
    workers_record,
)
from disagg.runtime.logs import quote

log = logging.getLogger("disagg.decisions")

DECISION_LOG_ERRORS = PREFIX + "decision_log_errors"  # counter (_total): failed writes, dropped
FLUSH_EVERY_S = 1.0
WARN_EVERY_S = 60.0
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class DecisionLog:
    def __init__(
        self, cfg: PolicyConfig, path: str = "", registry: CollectorRegistry | None = None
    ):
        self._path = path
        self._file: IO[str] | None = None
        self._version = -1
        self._flushed = 0.0  # monotonic time of the last flush
        self._warned = -WARN_EVERY_S  # monotonic time of the last warning
        self.errors = 0  # writes/flushes that failed (their records are lost)
        self._counter = (
            Counter(
                DECISION_LOG_ERRORS,
                "Decision-log writes that failed (records lost; the requests were served)",
                registry=registry,
            )
            if registry is not None
            else None
        )
        if path:
            self._open_at_start(path)
        self._write(config_record(cfg))
        self.flush()  # a disk that is full already shows at startup, not at the first request

    def _open_at_start(self, path: str) -> None:
        """A path that cannot be opened is a configuration error (raises); a full disk is not."""
        try:
            self._file = open(path, "a", buffering=1 << 16)
        except OSError as e:
            if e.errno not in _DISK_FULL:
                raise
            self._failed(e)

    def close(self) -> None:
        self.flush()
        self._discard()

    def cost(self, worker_id: str, cost: CostModel) -> None:
        self._write(cost_record(worker_id, cost))

    def decision(
        self,
        rid: str,
        version: int,
        snap: Snapshot,
        req: RouteRequest,
        d: Decision | None,
        error: str = "",
        client_rid: str = "",
    ) -> None:
        """Logs one decision under the internal id ``rid``; ``client_rid`` is the
        client's own id (quoted in the line: it cannot forge a field)."""
        out = outcome(d, error)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "decision request_id=%s client_request_id=%s prompt_tokens=%d max_tokens=%d "
                "hits=%d prefill=%s decode=%s reason=%r ttft_ms=%s itl_ms=%s rejected=%r",
                quote(rid),
                quote(client_rid),
                req.prompt_tokens,
                req.max_tokens,
                max(req.prefix_hits.values(), default=0),
                out.get("prefill") or "-",
                out.get("decode", "-"),
                out.get("reason", error),
                out.get("ttft_ms", "-"),
                out.get("itl_ms", "-"),
                out.get("rejected", ""),
            )
        if not self._path:
            return
        if version != self._version:
            self._version = version
            self._write(workers_record(version, snap.workers))
        rec = decision_record(rid, version, _nonzero(snap.loads), req, out)
        if client_rid:
            rec["client_rid"] = client_rid
        self._write(rec)

    def flush(self) -> None:
        self._flushed = time.monotonic()
        if self._file is None:
            return
        try:
            self._file.flush()
        except OSError as e:
            self._failed(e)

    def _write(self, rec: dict[str, Any]) -> None:
        if not self._path:
            return
        try:
            if self._file is None:
                self._file = open(self._path, "a", buffering=1 << 16)
            self._file.write(json.dumps(rec, separators=(",", ":")) + "\n")
        except OSError as e:
            self._failed(e)
            return
        if time.monotonic() - self._flushed >= FLUSH_EVERY_S:
            self.flush()

    def _failed(self, e: OSError) -> None:
        """Counts a failed write, warns (rate-limited) and drops the file: the next
        record reopens it, so the log resumes once the disk has room again."""
        self.errors += 1
        if self._counter is not None:
            self._counter.inc()
        self._discard()
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY_S:
            self._warned = now
            log.warning(
                "decision log write failed path=%s error=%s failures=%d "
                "(records lost; requests are still served)",
                quote(self._path),
                quote(e.strerror or e),
                self.errors,
            )

    def _discard(self) -> None:
        f, self._file = self._file, None
        if f is None:
            return
        try:
            f.close()  # closes the descriptor even when its final flush fails
        except OSError:
            pass


def _nonzero(loads: Mapping[str, Load]) -> dict[str, Load]:
    return dict(loads)
