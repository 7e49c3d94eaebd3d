"""`disagg up` supervises its services: a killed worker is restarted, the rest keep serving.

Through the user's entry point (`python -m disagg.cli up`, a real subprocess):
1. `--decode 2`, four greedy streams running, one decode worker SIGKILLed: the
   streams migrate and finish equal to uninterrupted runs, the launcher never
   stops, a new decode worker registers, the restart is counted on /metrics,
   and no block or KV key is left anywhere.
2. A service that keeps dying is a crash loop: the system stops with a message.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import redis

from disagg.metastore.keys import KV_PATTERN
from disagg.metrics.scrape import parse
from disagg.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from tests.e2e.test_up import (
    READY_TIMEOUT_S,
    UpProcess,
    _alive,
    _free_port,
    _generate,
    system_procs,
)

STREAM = {"max_tokens": 160, "temperature": 0.0, "ignore_eos": True}


def _decode_workers(address: str) -> dict[str, common_pb2.WorkerInfo]:
    with grpc.insecure_channel(address) as ch:
        ws = scheduler_pb2_grpc.SchedulerStub(ch).ListWorkers(
            scheduler_pb2.ListWorkersRequest(), timeout=5
        )
    return {w.worker_id: w for w in ws.workers if w.role == common_pb2.WORKER_ROLE_DECODE}


def _wait(predicate, timeout_s: float, what: str, logs) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s}s\n{logs()}"
        time.sleep(0.2)


def _restarts(http_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
        samples = parse(r.read().decode())
    return {
        dict(labels)["service"]: value
        for (name, labels), value in samples.items()
        if name == "disagg:service_restarts_total"
    }


def test_killed_decode_worker_is_restarted_while_streams_migrate(
    tiny_model: str, tmp_path: Path
) -> None:
    http_port = _free_port()
    up = UpProcess(
        tiny_model, tmp_path / "up.log", ("--decode", "2", "--http-port", str(http_port))
    )
    try:
        line = up.wait_ready(READY_TIMEOUT_S)
        redis_url = line.split("redis=", 1)[1].split()[0]
        before = _decode_workers(up.address)
        assert len(before) == 2
        prompts = [[11 + 7 * i, 12 + 7 * i, 13 + 7 * i] for i in range(4)]
        want = [_generate(up.address, prompt_token_ids=p, **STREAM)[0] for p in prompts]
        assert all(len(w) == STREAM["max_tokens"] for w in want) and len({*want[0]}) > 10

        got: list[list[int]] = [[] for _ in prompts]
        finish: list[str] = ["" for _ in prompts]
        errors: list[BaseException] = []

        def stream(i: int) -> None:
            try:
                with grpc.insecure_channel(up.address) as ch:
                    for r in scheduler_pb2_grpc.SchedulerStub(ch).Generate(
                        scheduler_pb2.GenerateRequest(prompt_token_ids=prompts[i], **STREAM),
                        timeout=120,
                    ):
                        got[i].extend(r.token_ids)
                        finish[i] = r.finish_reason or finish[i]
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        _wait(lambda: all(len(g) >= 10 for g in got) or errors, 60, "4 streams running", up.logs)
        busy = max(_decode_workers(up.address).values(), key=lambda w: w.running_requests)
        os.kill(busy.pid, signal.SIGKILL)
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert got == want  # migrated streams: no gap, no duplicate, same greedy tokens
        assert finish == ["length"] * len(prompts)
        assert up.proc.poll() is None, f"disagg up stopped\n{up.logs()}"

        def replaced() -> bool:
            now = _decode_workers(up.address)
            return len(now) == 2 and busy.worker_id not in now

        _wait(replaced, 60, "a new decode worker in the registry", up.logs)
        _wait(lambda: list(_restarts(http_port).values()) == [1.0], 10, "restart metric", up.logs)
        (service,) = _restarts(http_port)
        assert service.startswith("decode-")
        assert f"{service} restarted (restart 1)" in up.logs()

        ids, _, last = _generate(up.address, prompt_token_ids=prompts[0], **STREAM)
        assert ids == want[0] and last.finish_reason == "length"

        def no_leaks() -> bool:
            ws = _decode_workers(up.address)
            with redis.Redis.from_url(redis_url) as r:
                keys = list(r.scan_iter(KV_PATTERN))
            return not keys and all(w.free_blocks == w.total_blocks for w in ws.values())

        _wait(no_leaks, 10, "every block free and no KV key", up.logs)
        # the scheduler process times its garbage collector's pauses (it froze startup's)
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as r:
            samples = parse(r.read().decode())
        young = samples[("disagg:gc_pause_seconds_count", (("generation", "0"),))]
        assert young > 0
    finally:
        up.kill_everything(system_procs(up.proc.pid, up.port))


def test_crash_loop_stops_the_system_with_a_message(tiny_model: str, tmp_path: Path) -> None:
    up = UpProcess(tiny_model, tmp_path / "up.log", ("--max-restarts", "1"))
    procs = []
    try:
        up.wait_ready(READY_TIMEOUT_S)
        procs = system_procs(up.proc.pid, up.port)
        (first,) = _decode_workers(up.address).values()
        os.kill(first.pid, signal.SIGKILL)  # one exit: restarted

        def restarted() -> bool:
            return {*_decode_workers(up.address)} - {first.worker_id} != set()

        _wait(restarted, 60, "the restarted decode worker", up.logs)
        (second,) = (w for w in _decode_workers(up.address).values() if w.pid != first.pid)
        os.kill(second.pid, signal.SIGKILL)  # a second exit within the window: a crash loop
        try:
            code = up.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"disagg up still running after a crash loop\n{up.logs()}")
        assert code == 1
        assert "crash loop" in up.logs()
        time.sleep(1.0)  # orphans are reaped asynchronously
        left = [p.cmdline for p in procs if _alive(p)]
        assert left == [], left
    finally:
        up.kill_everything(procs or system_procs(up.proc.pid, up.port))
