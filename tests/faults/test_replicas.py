"""Scheduler replicas on one port (`disagg up --schedulers 2`, SO_REUSEPORT).

1. Both replicas join: each publishes its loads to Redis and sees the other's.
2. Sixteen greedy streams, each on its own connection, so the kernel spreads
   them over both replicas. One replica is SIGKILLed mid-stream: the streams
   on the other complete exactly; the killed replica's clients get UNAVAILABLE
   and succeed on retry (the other replica, or the restarted one). No KV block
   and no KV key is left behind (the dead replica's handles end by lease).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
import redis

from disagg.metastore.keys import KV_PATTERN
from disagg.metastore.store import MetaStore
from disagg.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from tests.e2e.test_up import READY_TIMEOUT_S, UpProcess, _generate, system_procs

# Long enough that no stream ends before the kill: it comes once every stream has its
# first token, and the calls start together (their connections made first).
STREAM = {"max_tokens": 240, "temperature": 0.0, "ignore_eos": True}
N_STREAMS = 16


def _workers(address: str) -> list[common_pb2.WorkerInfo]:
    with grpc.insecure_channel(address) as ch:
        return list(
            scheduler_pb2_grpc.SchedulerStub(ch)
            .ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=5)
            .workers
        )


def _replica_records(redis_url: str) -> list[str]:
    import asyncio

    async def read() -> list[str]:
        store = MetaStore(redis_url)
        try:
            return [r.replica_id for r in await store.list_scheduler_loads()]
        finally:
            await store.close()

    return asyncio.run(read())


def test_killed_replica_loses_only_its_streams(
    tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISAGG_KV_LEASE_S", "3")  # handles the dead replica never released
    up = UpProcess(tiny_model, tmp_path / "up.log", ("--schedulers", "2"))
    try:
        line = up.wait_ready(READY_TIMEOUT_S)
        assert "schedulers=2" in line
        redis_url = line.split("redis=", 1)[1].split()[0]
        assert sorted(_replica_records(redis_url)) == ["scheduler-0", "scheduler-1"]
        victim = next(
            p for p in system_procs(up.proc.pid, up.port) if "--replica-id scheduler-0" in p.cmdline
        )
        prompts = [[20 + i, 21 + i, 22 + i] for i in range(N_STREAMS)]
        want = {i: _generate(up.address, prompt_token_ids=prompts[i], **STREAM)[0] for i in (0, 1)}

        got: list[list[int]] = [[] for _ in prompts]
        codes: list[grpc.StatusCode | None] = [None] * N_STREAMS
        connected = threading.Barrier(N_STREAMS)
        started = threading.Barrier(N_STREAMS + 1)

        def stream(i: int) -> None:
            # One TCP connection each: a local subchannel pool, so channels to the
            # same target do not share the process-wide connection.
            with grpc.insecure_channel(up.address, [("grpc.use_local_subchannel_pool", 1)]) as ch:
                grpc.channel_ready_future(ch).result(timeout=30)
                connected.wait(timeout=60)  # every connection made: the calls start together
                call = scheduler_pb2_grpc.SchedulerStub(ch).Generate(
                    scheduler_pb2.GenerateRequest(prompt_token_ids=prompts[i], **STREAM),
                    timeout=120,
                )
                try:
                    for n, r in enumerate(call):
                        got[i].extend(r.token_ids)
                        if n == 0:
                            started.wait(timeout=60)
                    codes[i] = grpc.StatusCode.OK
                except grpc.RpcError as e:
                    codes[i] = e.code()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(N_STREAMS)]
        for t in threads:
            t.start()
        started.wait(timeout=60)  # every stream has its first token
        os.kill(victim.pid, signal.SIGKILL)
        for t in threads:
            t.join(timeout=120)
        lost = [i for i, c in enumerate(codes) if c != grpc.StatusCode.OK]
        kept = [i for i, c in enumerate(codes) if c == grpc.StatusCode.OK]
        assert lost and kept, f"the kernel put every stream on one replica: {codes}"
        assert {codes[i] for i in lost} == {grpc.StatusCode.UNAVAILABLE}, codes
        for i in kept:
            assert len(got[i]) == STREAM["max_tokens"]
            if i in want:
                assert got[i] == want[i]
        for i in lost:  # a retry succeeds, greedy-equal to an uninterrupted run
            ids = _retry_until_served(up.address, prompts[i])
            assert len(ids) == STREAM["max_tokens"]
            if i in want:
                assert ids == want[i]
        assert up.proc.poll() is None, up.logs()

        deadline = time.monotonic() + 15
        while True:
            ws = _workers(up.address)
            with redis.Redis.from_url(redis_url) as r:
                keys = list(r.scan_iter(KV_PATTERN))
            if not keys and all(w.free_blocks == w.total_blocks for w in ws):
                break
            assert time.monotonic() < deadline, (keys, [(w.worker_id, w.free_blocks) for w in ws])
            time.sleep(0.3)
    finally:
        up.kill_everything(system_procs(up.proc.pid, up.port))


def _retry_until_served(address: str, prompt: list[int]) -> list[int]:
    for _ in range(20):
        try:
            return _generate(address, prompt_token_ids=prompt, **STREAM)[0]
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE, e
            time.sleep(0.5)
    raise AssertionError("no replica served the retry")
