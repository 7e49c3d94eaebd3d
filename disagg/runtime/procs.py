"""Child processes of ``disagg up``: start them, watch them, stop all of them.

Contract:
- Each child runs in its own session/process group (so a terminal's Ctrl-C
  reaches only the parent, which then stops children in order) and, on
  Linux, gets SIGTERM if the parent dies (PR_SET_PDEATHSIG), so no child
  outlives a parent that was SIGKILLed. PDEATHSIG fires when the *thread*
  that spawned the child exits: call ``spawn`` from the main thread.
- Both output streams of every child are copied line by line to our stderr,
  prefixed ``[name]``; our stdout stays free for the launcher's own lines
  (e.g. the ``ready`` line). The last lines of each child are kept for error
  messages (``tail``).
- ``terminate_all`` sends SIGTERM to every group, SIGKILL to groups still
  alive after the timeout, and reaps everything.
- ``wait_any`` reports each child's exit once; ``wait_until`` raises
  ``ServiceExited`` if a child dies while waiting for a condition.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import IO

_PR_SET_PDEATHSIG = 1
_TAIL_LINES = 50
_POLL_S = 0.05


@dataclass(frozen=True)
class ExitedService:
    name: str
    pid: int
    returncode: int  # negative: killed by that signal


class ServiceExited(RuntimeError):
    """A child exited while the group was waiting for something else."""

    def __init__(self, exited: ExitedService, tail: Sequence[str]) -> None:
        lines = "\n".join(tail)
        super().__init__(f"{exited.name} (pid {exited.pid}) exited {exited.returncode}\n{lines}")
        self.exited = exited


def _pdeathsig_preexec() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork, used after it
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class _Child:
    def __init__(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        self.name = name
        self.proc = proc
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self.reported = False
        self.pumps: list[threading.Thread] = []


class ServiceGroup:
    """The children of one launcher. Not thread-safe: use from one thread."""

    def __init__(self, out: IO[str] | None = None) -> None:
        self._children: list[_Child] = []
        self._out = out if out is not None else sys.stderr
        self._out_lock = threading.Lock()
        self._out_broken = False  # our output failed once: keep draining, stop writing

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Starts argv as service name (env=None: inherit ours)."""
        proc = subprocess.Popen(
            list(argv),
            env=None if env is None else dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_pdeathsig_preexec(),
        )
        child = _Child(name, proc)
        for stream in (proc.stdout, proc.stderr):
            assert stream is not None
            pump = threading.Thread(
                target=self._pump, args=(child, stream), name=f"pump-{name}", daemon=True
            )
            pump.start()
            child.pumps.append(pump)
        self._children.append(child)
        return proc

    def _pump(self, child: _Child, stream: IO[bytes]) -> None:
        """Copies a child's output to ours until it closes. If ours breaks (a closed
        pipe, a full disk), the lines are still read and kept in the tail: a pump that
        stopped reading would leave the child blocked on a full pipe."""
        with stream:
            for raw in iter(stream.readline, b""):
                line = raw.decode(errors="replace").rstrip("\n")
                child.tail.append(line)
                if self._out_broken:
                    continue
                with self._out_lock:
                    try:
                        self._out.write(f"[{child.name}] {line}\n")
                        self._out.flush()
                    except (OSError, ValueError):  # EPIPE, ENOSPC, or closed
                        self._out_broken = True

    @property
    def pids(self) -> dict[str, int]:
        return {c.name: c.proc.pid for c in self._children}

    def tail(self, name: str) -> list[str]:
        """The last lines (stdout and stderr, interleaved) of service name."""
        return [line for c in self._children if c.name == name for line in c.tail]

    def running(self) -> list[str]:
        return [c.name for c in self._children if c.proc.poll() is None]

    def _poll_exited(self) -> ExitedService | None:
        for c in self._children:
            code = c.proc.poll()
            if code is not None and not c.reported:
                c.reported = True
                for pump in c.pumps:  # let its last lines arrive before anyone reads tail()
                    pump.join(timeout=1.0)
                return ExitedService(c.name, c.proc.pid, code)
        return None

    def wait_any(self, timeout_s: float | None = None) -> ExitedService | None:
        """The next child exit not reported before; None on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            exited = self._poll_exited()
            if exited is not None:
                return exited
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(_POLL_S)

    def wait_until(
        self, predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.1
    ) -> bool:
        """True once predicate() holds; False on timeout; ServiceExited if a child dies."""
        deadline = time.monotonic() + timeout_s
        while True:
            if predicate():
                return True
            exited = self._poll_exited()
            if exited is not None:
                raise ServiceExited(exited, self.tail(exited.name))
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)

    def _signal_groups(self, sig: signal.Signals) -> None:
        for c in self._children:
            if c.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.proc.pid, sig)  # pgid == pid: start_new_session

    def terminate_all(self, timeout_s: float = 10.0) -> dict[str, int]:
        """SIGTERM every group, SIGKILL what is left after timeout_s; name -> exit code."""
        live = [c for c in self._children if c.proc.poll() is None]
        self._signal_groups(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while self.running() and time.monotonic() < deadline:
            time.sleep(_POLL_S)
        self._signal_groups(signal.SIGKILL)
        for c in self._children:
            c.proc.wait()
            if c in live:  # reaped just now, so its pgid cannot have been reused yet
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.proc.pid, signal.SIGKILL)  # grandchildren left in the group
            for pump in c.pumps:
                pump.join(timeout=1.0)
        return {c.name: int(c.proc.returncode) for c in self._children}

    def __enter__(self) -> ServiceGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.terminate_all()
