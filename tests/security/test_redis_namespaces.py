"""Two deployments on one password-protected Valkey, through `disagg up`.

1. One Valkey with ``requirepass``; its URL (password included) reaches each
   `disagg up` in ``DISAGG_REDIS_URL`` only, never argv.
2. Two `disagg up` runs on it, ``--namespace blue`` and ``--namespace green``:
   each scheduler lists exactly its own workers (the processes `disagg up`
   started), and each request is prefilled and decoded by workers of its own
   deployment; every key in Redis lies under one of the two namespaces.
3. The password is in no process's command line, not in the `ready` line, not
   in the logs; the services have the URL in their environment.
4. Leak check: no KV record left under either namespace.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from disagg.metastore.embedded import EmbeddedValkey, start_embedded_valkey
from disagg.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from tests.e2e.test_up import READY_TIMEOUT_S, UpProcess, _generate, system_procs

PASSWORD = "pw-of-the-control-plane-7f3a"
NAMESPACES = ("blue", "green")


@pytest.fixture()
def locked_valkey() -> Iterator[EmbeddedValkey]:
    with start_embedded_valkey(password=PASSWORD) as server:
        yield server


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(kv.decode(errors="replace").split("=", 1) for kv in raw if b"=" in kv)


def _workers(address: str) -> list[common_pb2.WorkerInfo]:
    with grpc.insecure_channel(address) as ch:
        stub = scheduler_pb2_grpc.SchedulerStub(ch)
        return list(stub.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=10).workers)


def test_two_namespaces_on_one_locked_valkey_never_cross(
    tiny_model: str,
    tmp_path: Path,
    locked_valkey: EmbeddedValkey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DISAGG_REDIS_URL", locked_valkey.url)  # UpProcess passes os.environ on
    monkeypatch.setenv("DISAGG_COMPILE", "0")  # the workers' engines: quicker to start
    ups = {
        ns: UpProcess(tiny_model, tmp_path / f"{ns}.log", extra=("--namespace", ns))
        for ns in NAMESPACES
    }
    try:
        lines = {ns: up.wait_ready(READY_TIMEOUT_S) for ns, up in ups.items()}
        for ns, up in ups.items():
            line = lines[ns]
            assert f"namespace={ns}" in line and PASSWORD not in line
            assert f"redis=redis://:***@127.0.0.1:{locked_valkey.port}/0" in line

            procs = system_procs(up.proc.pid, up.port)
            pids = {p.pid for p in procs}
            workers = _workers(up.address)
            assert sorted(w.worker_id.split("-")[0] for w in workers) == ["decode", "prefill"]
            assert {w.pid for w in workers} <= pids, "a worker of the other deployment is listed"
            ids = {w.worker_id for w in workers}
            for n in (5, 40):
                out, _, last = _generate(  # sampled: ignore_eos, or an early EOS ends it short
                    up.address,
                    prompt_token_ids=list(range(3, 3 + n)),
                    max_tokens=4,
                    ignore_eos=True,
                )
                assert len(out) == 4
                assert {last.prefill_worker, last.decode_worker} <= ids

            assert all(PASSWORD not in p.cmdline for p in procs), [p.cmdline for p in procs]
            services = [p for p in procs if "disagg.cli " in p.cmdline and " up " not in p.cmdline]
            assert len(services) == 3  # scheduler, prefill, decode
            for p in services:
                assert _environ(p.pid).get("DISAGG_REDIS_URL") == locked_valkey.url
                assert f"--namespace {ns}" in p.cmdline
            assert PASSWORD not in up.logs()

        with redis.Redis.from_url(locked_valkey.url) as r:
            keys = [k.decode() for k in r.scan_iter("*")]
            assert keys and all(k.split(":", 1)[0] in NAMESPACES for k in keys), keys
            for ns in NAMESPACES:
                assert f"{ns}:workers" in keys
            deadline = time.monotonic() + 5  # the last records are deleted in the background
            while kv := [k for ns in NAMESPACES for k in r.scan_iter(f"{ns}:kv:*")]:
                assert time.monotonic() < deadline, f"KV records left: {kv}"
                time.sleep(0.1)
    finally:
        for up in ups.values():
            up.kill_everything(system_procs(up.proc.pid, up.port))
