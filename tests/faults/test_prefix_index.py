"""The prefix index comes from the workers: every scheduler replica routes on the same one.

Two schedulers (replicas A and B, separate ports, one Valkey), two prefill
workers, one decode worker, all real processes:
1. Prompt P1 is prefilled on prefill-a and P2 on prefill-b through replica A.
   Replica B never saw them, yet routes P1 + more to prefill-a and P2 + more to
   prefill-b, and the workers report the prefix hit (``cached_prompt_tokens``).
2. prefill-a evicts P1 (its pool refilled with other prompts): B's decision for
   P1 sees no hit any more.
3. prefill-b restarts (a new worker id): its entries vanish with it.
The prefill workers publish one configured cost (``--prefill-cost``): on the tiny
model a 64-token hit saves under a millisecond, less than two startup measurements
of identical workers differ under load, so measured costs would decide the route,
not the index.
B's index is read through probes: a request with an impossible TTFT SLO is
decided (the decision line logs ``hits=N``, the longest cached prefix B
predicted) and rejected before any prefill, so a probe changes no cache and
teaches B nothing itself.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from disagg.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.faults.test_worker_death import Procs, _free_port

BLOCK = 16
COST = ("--prefill-cost", "1.0,0.01")  # both prefill workers' published cost


@pytest.fixture()
def procs(tiny_model: str, tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tiny_model, tmp_path)
    try:
        yield p
    finally:
        p.stop()


def _send(address: str, prompt: list[int], rid: str, **pin: str) -> scheduler_pb2.GenerateResponse:
    last = None
    with grpc.insecure_channel(address) as ch:
        for r in scheduler_pb2_grpc.SchedulerStub(ch).Generate(
            scheduler_pb2.GenerateRequest(
                prompt_token_ids=prompt, max_tokens=2, temperature=0.0, request_id=rid, **pin
            ),
            timeout=60,
        ):
            last = r
    assert last is not None
    return last


def _predicted_hits(log: Path, rid: str) -> int:
    line = rf"decision request_id=\S+ client_request_id={rid} .*?hits=(\d+) "
    match = re.search(line, log.read_text())
    assert match, f"no decision line for {rid}"
    return int(match.group(1))


def _probe(address: str, prompt: list[int], rid: str) -> None:
    with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as err:
        for _ in scheduler_pb2_grpc.SchedulerStub(ch).Generate(
            scheduler_pb2.GenerateRequest(
                prompt_token_ids=prompt, max_tokens=2, request_id=rid, ttft_slo_ms=1e-6
            ),
            timeout=60,
        ):
            pass
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _wait_hits(address: str, log: Path, prompt: list[int], want: int, tag: str) -> None:
    """B's index reflects the workers' published caches within a couple of seconds."""
    for attempt in range(40):
        rid = f"{tag}-{attempt}"
        _probe(address, prompt, rid)
        if _predicted_hits(log, rid) == want:
            return
        time.sleep(0.25)
    raise AssertionError(f"{tag}: replica B never predicted {want} cached tokens")


def test_replica_b_routes_on_prefixes_cached_through_replica_a(procs: Procs) -> None:
    procs.scheduler()  # replica A
    port_b = _free_port()
    b = f"127.0.0.1:{port_b}"
    procs.spawn("sched-b", "scheduler", "--model", procs.model, "--port", str(port_b), "--http-port", "-1")  # fmt: skip
    for w in ("prefill-a", "prefill-b"):
        procs.worker("prefill", w, *COST)
    procs.worker("decode", "decode-a")
    procs.wait_workers({"prefill-a", "prefill-b", "decode-a"})
    p1 = [100 + i for i in range(4 * BLOCK)]
    p2 = [300 + i for i in range(4 * BLOCK)]
    assert (
        _send(procs.address, p1, "a-p1", prefill_worker="prefill-a").prefill_worker == "prefill-a"
    )
    assert (
        _send(procs.address, p2, "a-p2", prefill_worker="prefill-b").prefill_worker == "prefill-b"
    )

    log_b = procs.tmp / "sched-b.log"
    tail = [7, 8, 9, 10, 11]
    _wait_hits(b, log_b, [*p1, *tail], 4 * BLOCK, "b-p1")
    _wait_hits(b, log_b, [*p2, *tail], 4 * BLOCK, "b-p2")
    for prompt, worker in (([*p1, *tail], "prefill-a"), ([*p2, *tail], "prefill-b")):
        last = _send(b, prompt, f"b-check-{worker}")
        assert last.prefill_worker == worker
        assert last.usage.cached_prompt_tokens >= 4 * BLOCK

    # prefill-a's pool (64 blocks) refilled with other prompts: P1's blocks are evicted.
    for k in range(6):
        filler = [5 + (k * 97 + i * 7) % 500 for i in range(12 * BLOCK)]
        _send(procs.address, filler, f"fill-{k}", prefill_worker="prefill-a")
    _wait_hits(b, log_b, [*p1, *tail], 0, "b-evicted")

    # prefill-b restarts under a new id: its published cache is gone with the old id.
    procs.kill("prefill-b")
    procs.worker("prefill", "prefill-b2", *COST)
    procs.wait_workers({"prefill-a", "prefill-b2", "decode-a"})
    _wait_hits(b, log_b, [*p2, *tail], 0, "b-restarted")
