"""Workers killed with SIGKILL: streams migrate, prefills re-route, nothing leaks.

Real processes (`disagg scheduler|prefill|decode`) on loopback with a real Valkey.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from disagg.metastore.embedded import start_embedded_valkey
from disagg.metastore.keys import KV_PATTERN
from disagg.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.ports import free_port as _free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


class Procs:
    def __init__(self, model: str, tmp: Path, kv_transport: str = "auto"):
        self.model = model
        self.kv_transport = kv_transport  # every worker's --kv-transport
        self.tmp = tmp
        self.valkey = start_embedded_valkey()
        self.port = _free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "DISAGG_HEARTBEAT_S": "0.5",
            "DISAGG_HEARTBEAT_TTL_S": "2.0",
            "DISAGG_REGISTRY_REFRESH_S": "0.1",
        }

    def spawn(self, name: str, *argv: str) -> None:
        log = open(self.tmp / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "disagg.cli", *argv, "--redis-url", self.valkey.url],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def scheduler(self, *extra: str) -> None:
        argv = ["--model", self.model, "--port", str(self.port), "--http-port", "-1", *extra]
        self.spawn("scheduler", "scheduler", *argv)

    def worker(self, role: str, worker_id: str, *extra: str) -> None:
        self.spawn(
            worker_id,
            role,
            "--model",
            self.model,
            "--worker-id",
            worker_id,
            "--threads",
            "1",
            "--num-blocks",
            "64",
            "--kv-transport",
            self.kv_transport,
            *extra,
        )

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(10)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def workers(self) -> dict[str, common_pb2.WorkerInfo]:
        with grpc.insecure_channel(self.address) as ch:
            ws = (
                scheduler_pb2_grpc.SchedulerStub(ch)
                .ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=5)
                .workers
            )
        return {w.worker_id: w for w in ws}

    def wait_workers(self, want: set[str], timeout_s: float = 120) -> float:
        start = time.monotonic()
        while True:
            try:
                if set(self.workers()) == want:
                    return time.monotonic() - start
            except grpc.RpcError:
                pass
            if time.monotonic() - start > timeout_s:
                logs = "\n".join(p.read_text()[-1500:] for p in self.tmp.glob("*.log"))
                raise TimeoutError(f"workers {want} not seen; logs:\n{logs}")
            time.sleep(0.1)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        self.valkey.stop()


@pytest.fixture(params=["nixl", "grpc"])
def procs(tiny_model: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Procs]:
    """The processes of one test, every worker on one KV transport (each test runs for both)."""
    p = Procs(tiny_model, tmp_path, request.param)
    try:
        yield p
    finally:
        p.stop()


def _stream(address: str, **fields: object) -> tuple[list[int], scheduler_pb2.GenerateResponse]:
    ids: list[int] = []
    last = None
    with grpc.insecure_channel(address) as ch:
        for r in scheduler_pb2_grpc.SchedulerStub(ch).Generate(
            scheduler_pb2.GenerateRequest(**fields), timeout=60
        ):
            ids.extend(r.token_ids)
            last = r
    assert last is not None
    return ids, last


def _no_leaks(procs: Procs, names: list[str], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        ws = procs.workers()
        full = all(ws[n].free_blocks == ws[n].total_blocks for n in names)
        with redis.Redis.from_url(procs.valkey.url) as r:
            keys = list(r.scan_iter(KV_PATTERN))
        if full and not keys:
            return
        assert time.monotonic() < deadline, (
            f"leak: {[(n, ws[n].free_blocks, ws[n].total_blocks) for n in names]} keys={keys}"
        )
        time.sleep(0.2)


def test_decode_worker_killed_mid_stream_migrates(procs: Procs) -> None:
    procs.scheduler()
    procs.worker("prefill", "prefill-a")
    procs.worker("decode", "decode-a")
    procs.worker("decode", "decode-b")
    procs.wait_workers({"prefill-a", "decode-a", "decode-b"})
    req = {
        "prompt_token_ids": [11, 12, 13],
        "max_tokens": 250,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    want, _ = _stream(procs.address, **req, decode_worker="decode-b")
    assert len(want) == 250 and len(set(want)) > 10

    got: list[int] = []
    with grpc.insecure_channel(procs.address) as ch:
        stream = scheduler_pb2_grpc.SchedulerStub(ch).Generate(
            scheduler_pb2.GenerateRequest(**req, decode_worker="decode-a"), timeout=60
        )
        killed_at = None
        for r in stream:
            got.extend(r.token_ids)
            # at its first token: a fast engine finishes 250 tokens before the client reads 20
            if killed_at is None and len(got) >= 2:
                procs.kill("decode-a")
                killed_at = time.monotonic()
            last = r
    assert got == want  # no gap, no duplicate, same greedy tokens as an uninterrupted run
    assert last.finish_reason == "length" and last.decode_worker == "decode-b"
    assert killed_at is not None
    procs.wait_workers({"prefill-a", "decode-b"}, timeout_s=5)
    gone_s = time.monotonic() - killed_at
    print(
        f"decode worker SIGKILLed after its first token: {len(got)} tokens equal to an uninterrupted run; "
        f"out of the registry after {gone_s:.2f} s"
    )
    assert gone_s < 3.0, "the dead worker stayed in the registry"
    _no_leaks(procs, ["prefill-a", "decode-b"])

    # No decode worker left: a clean UNAVAILABLE.
    procs.kill("decode-b")
    with pytest.raises(grpc.RpcError) as err:
        _stream(procs.address, prompt_token_ids=[5, 6], max_tokens=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_prefill_worker_killed_requests_reroute(procs: Procs) -> None:
    procs.scheduler("--local-prefill-tokens", "0")
    procs.worker("prefill", "prefill-a")
    procs.worker("decode", "decode-a")
    procs.wait_workers({"prefill-a", "decode-a"})
    prompt = list(range(20, 60))
    want, last = _stream(
        procs.address, prompt_token_ids=prompt, max_tokens=30, temperature=0.0, ignore_eos=True
    )
    assert last.prefill_worker == "prefill-a"

    # Killed after prefilling, before the decode worker pulled: the pull fails, decode recomputes.
    prefill_addr = procs.workers()["prefill-a"].address
    decode_addr = procs.workers()["decode-a"].address
    with grpc.insecure_channel(prefill_addr) as ch:
        handle = (
            worker_pb2_grpc.PrefillWorkerStub(ch)
            .Prefill(
                worker_pb2.PrefillRequest(
                    request_id="orphaned",
                    prompt_token_ids=prompt,
                    sampling=common_pb2.SamplingParams(max_tokens=30, ignore_eos=True),
                )
            )
            .handle
        )
    procs.kill("prefill-a")
    with grpc.insecure_channel(decode_addr) as ch:
        rest = [
            t
            for r in worker_pb2_grpc.DecodeWorkerStub(ch).Decode(
                worker_pb2.DecodeRequest(
                    request_id="orphaned",
                    prompt_token_ids=prompt,
                    sampling=common_pb2.SamplingParams(max_tokens=30, ignore_eos=True),
                    handle=handle,
                ),
                timeout=30,
            )
            for t in r.token_ids
        ]
    assert [handle.first_token_id, *rest] == want  # never a partial KV: recomputed, same tokens

    # New requests while the dead prefill worker may still be listed: re-routed to local prefill.
    got, last = _stream(
        procs.address, prompt_token_ids=prompt, max_tokens=30, temperature=0.0, ignore_eos=True
    )
    assert got == want and last.prefill_worker == "decode-a"
    procs.wait_workers({"decode-a"}, timeout_s=5)
    _no_leaks(procs, ["decode-a"])
