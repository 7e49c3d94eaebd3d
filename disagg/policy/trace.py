"""The decision log as data: records in, the same decisions out (pure; no files).

The log is event-sourced so a 256-worker snapshot is not repeated per request:

- ``config``: the PolicyConfig in force (first record, and after any change);
- ``workers``: the heartbeat views, versioned, written when they change;
- ``cost``: one worker's refined cost model, written when it changes;
- ``decision``: one request: the workers version, the scheduler's loads, the
  request inputs (prompt length, max_tokens, prefix hits, SLOs, pins, seq) and
  the outcome.

``replay`` folds the records in order and re-decides every ``decision``; a
policy that is a pure function of its inputs gives back the logged outcomes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from disagg.policy.cost import CostModel, DecodeCost
from disagg.policy.routing import (
    Decision,
    Load,
    NoWorker,
    PolicyConfig,
    RouteRequest,
    Snapshot,
    WorkerView,
    decide,
)

Record = dict[str, Any]


def config_record(cfg: PolicyConfig) -> Record:
    return {"kind": "config", "policy": dataclasses.asdict(cfg)}


def workers_record(version: int, workers: Iterable[WorkerView]) -> Record:
    return {"kind": "workers", "v": version, "workers": [dataclasses.astuple(w) for w in workers]}


def cost_record(worker_id: str, cost: CostModel) -> Record:
    return {"kind": "cost", "worker": worker_id, "cost": dataclasses.astuple(cost)}


def outcome(d: Decision | None, error: str = "") -> dict[str, Any]:
    if d is None:
        return {"error": error}
    return {
        "prefill": d.prefill.worker_id if d.prefill else None,
        "decode": d.decode.worker_id,
        "reason": d.reason,
        "ttft_ms": round(d.predicted_ttft_ms, 3),
        "itl_ms": round(d.predicted_itl_ms, 3),
        "rejected": d.rejected,
        "retry_after_s": d.retry_after_s,
    }


def decision_record(
    rid: str,
    version: int,
    loads: Mapping[str, Load],
    req: RouteRequest,
    out: dict[str, Any],
) -> Record:
    return {
        "kind": "decision",
        "rid": rid,
        "v": version,
        "loads": {k: [v.requests, v.tokens, v.blocks] for k, v in loads.items()},
        "req": dataclasses.asdict(req),
        "out": out,
    }


def config_from(rec: Record) -> PolicyConfig:
    p = dict(rec["policy"])
    p["prefill_prior"] = CostModel(**p["prefill_prior"])
    p["decode_cost"] = DecodeCost(**p["decode_cost"])
    return PolicyConfig(**p)


@dataclass
class Mismatch:
    rid: str
    logged: dict[str, Any]
    replayed: dict[str, Any]


@dataclass
class ReplayResult:
    decisions: int = 0
    mismatches: list[Mismatch] = dataclasses.field(default_factory=list)


def replay(records: Iterable[Record]) -> ReplayResult:
    cfg = PolicyConfig()
    workers: dict[int, list[WorkerView]] = {}
    costs: dict[str, CostModel] = {}
    result = ReplayResult()
    for rec in records:
        kind = rec.get("kind")
        if kind == "config":
            cfg = config_from(rec)
        elif kind == "workers":
            workers = {rec["v"]: [WorkerView(*w) for w in rec["workers"]]}
        elif kind == "cost":
            costs[rec["worker"]] = CostModel(*rec["cost"])
        elif kind == "decision":
            result.decisions += 1
            got = redecide(cfg, workers.get(rec["v"], []), costs, rec)
            if got != rec["out"]:
                result.mismatches.append(Mismatch(rec["rid"], rec["out"], got))
    return result


def redecide(
    cfg: PolicyConfig, workers: list[WorkerView], costs: Mapping[str, CostModel], rec: Record
) -> dict[str, Any]:
    loads = {k: Load(*v) for k, v in rec["loads"].items()}
    req = RouteRequest(**rec["req"])
    snap = Snapshot(workers, loads, dict(costs))
    try:
        return outcome(decide(snap, req, cfg))
    except NoWorker as e:
        return outcome(None, str(e))
