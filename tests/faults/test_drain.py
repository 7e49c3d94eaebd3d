"""Graceful drain: NOT_SERVING at once, in-flight streams finish, new requests refused."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from disagg.v1 import scheduler_pb2, scheduler_pb2_grpc


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return (
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        )


def test_scheduler_drain(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster()
    out: dict[str, object] = {}
    first = threading.Event()

    def long_stream() -> None:
        ids = []
        req = scheduler_pb2.GenerateRequest(
            prompt_token_ids=[5, 6], max_tokens=200, temperature=0, ignore_eos=True
        )
        with grpc.insecure_channel(cluster.address) as ch:
            for r in scheduler_pb2_grpc.SchedulerStub(ch).Generate(req):
                ids.extend(r.token_ids)
                first.set()
                out["finish"] = r.finish_reason
        out["ids"] = ids

    t = threading.Thread(target=long_stream)
    t.start()
    assert first.wait(10)
    assert _health(cluster.address) == health_pb2.HealthCheckResponse.SERVING
    cluster._loop.call_soon_threadsafe(cluster.app.request_stop)
    deadline = time.monotonic() + 2
    while True:
        try:
            status = _health(cluster.address)
        except grpc.RpcError:
            status = -1  # already stopped listening: also not serving
        if status != health_pb2.HealthCheckResponse.SERVING:
            break
        assert time.monotonic() < deadline, "still SERVING after the drain began"
        time.sleep(0.02)
    with pytest.raises(grpc.RpcError) as err:
        list(
            cluster.stub().Generate(
                scheduler_pb2.GenerateRequest(prompt_token_ids=[5], max_tokens=2), timeout=5
            )
        )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    t.join(30)
    assert out["finish"] == "length" and len(out["ids"]) == 200  # type: ignore[arg-type]


def test_decode_worker_drain_finishes_inflight_and_leaves_registry(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster()
    decode = cluster.decode_hosts[0]
    out: dict[str, object] = {}
    started = threading.Event()

    def long_stream() -> None:
        req = scheduler_pb2.GenerateRequest(
            prompt_token_ids=[5, 6], max_tokens=150, temperature=0, ignore_eos=True
        )
        ids = []
        for r in cluster.stub().Generate(req):
            ids.extend(r.token_ids)
            if len(ids) >= 2:  # the first token comes from prefill, the rest from decode
                started.set()
            out["finish"] = r.finish_reason
        out["ids"] = ids

    t = threading.Thread(target=long_stream)
    t.start()
    assert started.wait(10)  # the Decode RPC is in flight: the drain must let it finish
    cluster._loop.call_soon_threadsafe(decode.request_stop)
    t.join(30)
    assert out["finish"] == "length" and len(out["ids"]) == 150  # type: ignore[arg-type]
    workers = cluster.stub().ListWorkers(scheduler_pb2.ListWorkersRequest()).workers
    assert [w.worker_id for w in workers] == [cluster.prefill_hosts[0].worker_id]
    with pytest.raises(grpc.RpcError) as err:
        list(
            cluster.stub().Generate(
                scheduler_pb2.GenerateRequest(prompt_token_ids=[5], max_tokens=2)
            )
        )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
