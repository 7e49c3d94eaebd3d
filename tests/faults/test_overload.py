"""A burst of 10x capacity: the excess is refused at once, admitted requests keep their SLO."""

from __future__ import annotations

import threading
import time

import grpc

from disagg.v1 import scheduler_pb2, scheduler_pb2_grpc

CAPACITY = 8  # admitted requests in flight (max_inflight)
SLO_TTFT_MS = 3000.0


def test_burst_of_ten_times_capacity(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(
        engine={"max_num_seqs": CAPACITY},
        scheduler={"max_inflight": CAPACITY, "slo_ttft_ms": SLO_TTFT_MS},
    )
    results: list[
        tuple[str, float, int, str]
    ] = []  # (outcome, ttft or reject ms, tokens, retry-after)
    lock = threading.Lock()
    go = threading.Event()

    def one(i: int) -> None:
        req = scheduler_pb2.GenerateRequest(
            prompt_token_ids=[5 + i % 50, 6, 7], max_tokens=120, temperature=0, ignore_eos=True
        )
        with grpc.insecure_channel(cluster.address) as ch:
            stub = scheduler_pb2_grpc.SchedulerStub(ch)
            go.wait()
            start = time.monotonic()
            call = stub.Generate(req, timeout=60)
            ttft, n = None, 0
            try:
                for r in call:
                    ttft = ttft if ttft is not None else (time.monotonic() - start) * 1000
                    n += len(r.token_ids)
                out = ("ok", ttft or 0.0, n, "")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                retry = dict(call.initial_metadata() or ()).get("retry-after", "")
                out = ("rejected", (time.monotonic() - start) * 1000, n, retry)
        with lock:
            results.append(out)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(10 * CAPACITY)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # every client connected: one burst
    go.set()
    for t in threads:
        t.join(120)
    ok = [r for r in results if r[0] == "ok"]
    rejected = [r for r in results if r[0] == "rejected"]
    assert len(results) == 10 * CAPACITY
    assert len(ok) >= CAPACITY and rejected, (len(ok), len(rejected))
    assert all(n == 120 for _, _, n, _ in ok)  # admitted requests complete in full
    assert all(n == 0 for _, _, n, _ in rejected)  # refused before any work, not midway
    assert all(retry for *_, retry in rejected), "a rejection without a retry hint"
    assert all(ttft <= SLO_TTFT_MS for _, ttft, _, _ in ok), sorted(t for _, t, _, _ in ok)
    print(
        f"burst {len(results)}: admitted {len(ok)}, rejected {len(rejected)}; "
        f"max admitted TTFT {max(t for _, t, _, _ in ok):.0f} ms, "
        f"max rejection latency {max(t for _, t, _, _ in rejected):.0f} ms"
    )
    cluster.wait_no_leaks(timeout_s=10)
    ids, _, _ = cluster.generate(prompt_token_ids=[5, 6], max_tokens=4, temperature=0)
    assert len(ids) == 4
