"""`disagg up` as a user runs it: a subprocess that serves, answers the CLI, and stops clean.

1. Start `python -m disagg.cli up` (tiny model, free port, HTTP off) in its own session.
2. Wait for the stdout line containing `ready`.
3. Generate through the gRPC stub and through the `disagg generate` / `disagg workers` CLI.
4. Record every process of the system: the launcher's descendants (the services run in
   sessions of their own), its session (the embedded valkey-server) and anything whose
   command line names the scheduler port.
5. SIGINT or SIGTERM: exit code 0 within 30 s, and every recorded process is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from disagg.engine.testing import GreedyReference, prompt_of
from disagg.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.ports import free_port as _free_port

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    sid: int
    start_ticks: int  # with pid: survives pid reuse
    state: str
    cmdline: str


def _read_proc(pid: int) -> Proc | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = stat[stat.rindex(")") + 2 :].split()
    return Proc(
        pid=pid,
        ppid=int(rest[1]),
        sid=int(rest[3]),
        start_ticks=int(rest[19]),
        state=rest[0],
        cmdline=cmdline,
    )


def _all_procs() -> list[Proc]:
    procs = (_read_proc(int(d)) for d in os.listdir("/proc") if d.isdigit())
    return [p for p in procs if p is not None]


def system_procs(launcher_pid: int, port: int) -> list[Proc]:
    """The launcher and every process that belongs to the system it started."""
    procs = _all_procs()
    children: dict[int, list[Proc]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    found: dict[int, Proc] = {
        p.pid: p
        for p in procs
        if p.pid == launcher_pid or p.sid == launcher_pid or f"--port {port} " in p.cmdline + " "
    }
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            if child.pid not in found:
                found[child.pid] = child
                todo.append(child.pid)
    found.pop(os.getpid(), None)
    return sorted(found.values(), key=lambda p: p.pid)


def _alive(p: Proc) -> bool:
    now = _read_proc(p.pid)
    return now is not None and now.start_ticks == p.start_ticks and now.state != "Z"


class UpProcess:
    """A running `disagg up`; stdout lines are queued, stderr (the services' logs) goes to a file."""

    def __init__(
        self,
        model: str,
        log_path: Path,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # closed in kill_everything()
        argv = [
            sys.executable,
            "-m",
            "disagg.cli",
            "up",
            "--model",
            model,
            "--port",
            str(self.port),
            "--http-port",
            "-1",
            "--prefill",
            "1",
            "--decode",
            "1",
            *extra,  # later flags win: extra may override the ones above
        ]
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def wait_ready(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no `ready` line after {timeout_s}s\n{self.logs()}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(
                    f"disagg up exited {self.proc.wait()} before ready\n{self.logs()}"
                )
            if "ready" in line:
                return line

    def kill_everything(self, procs: list[Proc]) -> None:
        """Last-resort cleanup after a failed test: no process may outlive it."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for p in procs:
            if _alive(p):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        self._log.close()


@pytest.fixture()
def up(tiny_model: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[UpProcess]:
    """`disagg up`; parametrized indirectly with a KV transport, `--kv-transport` that
    ("nixl+stream": NIXL, and prompts of 64 tokens or more streamed layer-wise)."""
    transport = getattr(request, "param", None)
    extra: tuple[str, ...] = ("--kv-transport", transport) if transport else ()
    if transport == "nixl+stream":
        extra = ("--kv-transport", "nixl", "--kv-stream-tokens", "64")
    server = UpProcess(tiny_model, tmp_path / "up.log", extra=extra)
    yield server
    server.kill_everything(system_procs(server.proc.pid, server.port))


def _generate(address: str, **fields: Any) -> tuple[list[int], str, scheduler_pb2.GenerateResponse]:
    ids: list[int] = []
    text = ""
    last = None
    with grpc.insecure_channel(address) as channel:
        for resp in scheduler_pb2_grpc.SchedulerStub(channel).Generate(
            scheduler_pb2.GenerateRequest(**fields), timeout=60
        ):
            ids.extend(resp.token_ids)
            text += resp.text
            last = resp
    assert last is not None
    return ids, text, last


def _check_greedy_handoffs(
    up: UpProcess, reference: GreedyReference, transport: str, streamed: bool = False
) -> None:
    for n in (20, 70):
        prompt = prompt_of(n, seed=n)
        want = reference(prompt, 16)
        assert len(set(want)) >= 4, "reference output not diverse"
        ids, _, last = _generate(up.address, prompt_token_ids=prompt, max_tokens=16, temperature=0)
        assert ids == want
        assert last.prefill_worker.startswith("prefill-")  # disaggregated: a real handoff
        assert last.timings.kv_transfer_ms > 0
    logs = up.log_path.read_text(errors="replace")
    assert f"kv transport {transport} from owner=prefill-" in logs, logs[-3000:]
    assert "kv pull failed" not in logs
    if streamed:  # the 70-token prompt's KV went layer by layer
        assert "kv streamed layer-wise" in logs, logs[-3000:]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "disagg.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _check_cli(address: str) -> None:
    want_ids, want_text, _ = _generate(address, prompt="t5 t6 t7", max_tokens=5, temperature=0)
    assert want_ids and want_text.strip()
    gen = _cli("generate", "t5 t6 t7", "--address", address, "--max-tokens", "5")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.strip() == want_text.strip()  # greedy is the CLI's default
    assert "[length]" in gen.stderr or "[stop]" in gen.stderr

    workers = _cli("workers", "--address", address)
    assert workers.returncode == 0, workers.stderr
    roles = sorted(w["role"] for w in json.loads(workers.stdout)["workers"])
    assert roles == ["WORKER_ROLE_DECODE", "WORKER_ROLE_PREFILL"]


@pytest.mark.parametrize(
    ("sig", "up"),
    [(signal.SIGINT, "nixl+stream"), (signal.SIGTERM, "grpc")],
    ids=["SIGINT-nixl-layerwise", "SIGTERM-grpc"],
    indirect=["up"],
)
def test_up_serves_and_stops_clean(
    up: UpProcess, sig: signal.Signals, tiny_reference: GreedyReference
) -> None:
    """Each stop signal once, each KV transport once (greedy-equal through the handoff;
    over NIXL, the longer prompt streamed layer by layer)."""
    line = up.wait_ready(READY_TIMEOUT_S)
    assert up.address in line
    nixl = sig == signal.SIGINT
    _check_greedy_handoffs(up, tiny_reference, "nixl" if nixl else "grpc", streamed=nixl)

    ids, _, last = _generate(up.address, prompt_token_ids=[5, 6, 7], max_tokens=5, temperature=0)
    assert len(ids) == 5
    assert last.finish_reason == "length"
    assert last.usage.prompt_tokens == 3 and last.usage.completion_tokens == 5
    assert last.prefill_worker.startswith("prefill-") and last.decode_worker.startswith("decode-")
    if sig == signal.SIGINT:  # the CLI client once is enough
        _check_cli(up.address)

    procs = system_procs(up.proc.pid, up.port)
    names = " ".join(p.cmdline for p in procs)
    for what in (
        "disagg.cli up",
        "disagg.cli scheduler",
        "disagg.cli prefill",
        "disagg.cli decode",
        "valkey-server",
    ):
        assert what in names, f"{what!r} not among the recorded processes:\n" + "\n".join(
            p.cmdline for p in procs
        )
    assert len(procs) >= 5

    up.proc.send_signal(sig)
    try:
        code = up.proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"disagg up still running {STOP_TIMEOUT_S}s after {sig.name}\n{up.logs()}")
    assert code == 0, up.logs()

    deadline = time.monotonic() + 5.0  # orphans are reaped by init asynchronously
    while (left := [p for p in procs if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, "still running after stop:\n" + "\n".join(f"{p.pid} {p.cmdline}" for p in left)
    with socket.socket() as s, pytest.raises(OSError):
        s.settimeout(1.0)
        s.connect(("127.0.0.1", up.port))
