"""The decision log: every routing decision, structured, with its inputs.

Each decision is one ``decision`` log line (key=value, for people) and, when a
path is configured, one JSON line of ``disagg.policy.trace`` records (for
``disagg replay``): the worker views and cost models are written when they
change, each decision with the loads and request inputs it was made from.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import IO, Any

from disagg.policy.cost import CostModel
from disagg.policy.routing import Decision, Load, PolicyConfig, RouteRequest, Snapshot
from disagg.policy.trace import (
    config_record,
    cost_record,
    decision_record,
    outcome,
    workers_record,
)

log = logging.getLogger("disagg.decisions")


class DecisionLog:
    def __init__(self, cfg: PolicyConfig, path: str = ""):
        self._file: IO[str] | None = open(path, "a", buffering=1 << 16) if path else None
        self._version = -1
        self._write(config_record(cfg))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

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
    ) -> None:
        out = outcome(d, error)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "decision request_id=%s prompt_tokens=%d max_tokens=%d hits=%d prefill=%s "
                "decode=%s reason=%r ttft_ms=%s itl_ms=%s rejected=%r",
                rid,
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
        if self._file is None:
            return
        if version != self._version:
            self._version = version
            self._write(workers_record(version, snap.workers))
        self._write(decision_record(rid, version, _nonzero(snap.loads), req, out))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def _write(self, rec: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(rec, separators=(",", ":")) + "\n")


def _nonzero(loads: Mapping[str, Load]) -> dict[str, Load]:
    return dict(loads)
