"""Lease expiry frees unpulled KV; a Redis/Valkey restart is survived."""

from __future__ import annotations

import random
import threading
import time

import grpc
import pytest

from disagg.metastore.embedded import start_embedded_valkey
from disagg.v1 import common_pb2, scheduler_pb2, worker_pb2, worker_pb2_grpc


def test_unpulled_kv_is_freed_when_its_lease_expires(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(worker={"kv_lease_s": 0.5})
    prefill = cluster.prefill_hosts[0]
    total = prefill.engine.stats().total_blocks
    with grpc.insecure_channel(prefill.address) as ch:
        stub = worker_pb2_grpc.PrefillWorkerStub(ch)
        stub.Prefill(
            worker_pb2.PrefillRequest(
                request_id="orphan-1",
                prompt_token_ids=list(range(3, 60)),
                sampling=common_pb2.SamplingParams(max_tokens=4),
            )
        )
        assert prefill.engine.stats().free_blocks == total - 4
        assert cluster.kv_keys() == 1
        cluster.wait_no_leaks(timeout_s=3.0)  # the lease ran out: blocks and handle gone
        with pytest.raises(grpc.RpcError) as err:
            list(stub.PullKv(worker_pb2.PullKvRequest(request_id="orphan-1")))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    servicer_freed = cluster.run(_freed(prefill))
    assert servicer_freed["expired"] == 1


def test_a_request_cancelled_around_its_prefill_leaves_nothing_held(make_cluster) -> None:  # type: ignore[no-untyped-def]
    """Generate calls cancelled at random points before, during and right after their
    remote prefill. A call cancelled after the prefill worker had held the KV, with its
    answer (the only carrier of the handle) still on the way, left the blocks held until
    the lease (30 s) ran out: the scheduler now releases such a prefill by id."""
    cluster = make_cluster()
    prefill = cluster.prefill_hosts[0]
    stub = cluster.stub()
    rng = random.Random(7)
    for i in range(80):
        call = stub.Generate(
            scheduler_pb2.GenerateRequest(
                prompt_token_ids=[3 + (i * 7 + j) % 200 for j in range(48)],
                max_tokens=4,
                prefill_worker=prefill.worker_id,
            ),
            timeout=30,
        )
        time.sleep(rng.random() * 0.03)
        call.cancel()
    cluster.wait_no_leaks(timeout_s=3.0)
    freed = cluster.run(_freed(prefill))
    # some were cancelled with their KV held there (freed by a release, as "failed"),
    # some reached the decode worker ("consumed"); none waited for the lease
    assert freed["failed"] > 0 and freed["consumed"] > 0 and freed["expired"] == 0, freed


async def _freed(host):  # type: ignore[no-untyped-def]
    return host.servicer.freed


def test_valkey_restart_inflight_finish_and_new_requests_served(make_cluster) -> None:  # type: ignore[no-untyped-def]
    server = start_embedded_valkey()
    try:
        cluster = make_cluster(redis_url=server.url)
        result: dict[str, object] = {}

        def long_request() -> None:
            result["out"] = cluster.generate(
                prompt_token_ids=[5, 6, 7], max_tokens=150, temperature=0, ignore_eos=True
            )

        t = threading.Thread(target=long_request)
        t.start()
        time.sleep(0.05)
        server.stop()
        time.sleep(2.0)  # unreachable for a while
        server.start()
        back = time.monotonic()
        t.join(30)
        ids, _, last = result["out"]  # type: ignore[misc]
        assert len(ids) == 150 and last.finish_reason == "length"
        # Workers re-register; new requests are served within 5 s of Redis returning.
        while True:
            workers = cluster.stub().ListWorkers(scheduler_pb2.ListWorkersRequest()).workers
            if len(workers) == 2:
                break
            assert time.monotonic() - back < 5.0, "workers did not re-register within 5 s"
            time.sleep(0.1)
        registered_s = time.monotonic() - back
        ids, _, _ = cluster.generate(prompt_token_ids=[5, 6, 7], max_tokens=5, temperature=0)
        assert len(ids) == 5
        served_s = time.monotonic() - back
        print(
            f"valkey down 2 s: in-flight stream finished; workers re-registered {registered_s:.2f} s "
            f"and a new request served {served_s:.2f} s after it returned"
        )
        assert served_s < 5.0
        cluster.wait_no_leaks()
    finally:
        server.stop()
