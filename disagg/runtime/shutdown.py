"""A deadline on a service's shutdown: the process ends within a bound, whatever hangs.

A service stops in order (NOT_SERVING, streams drained for their grace, clients
and stores closed), then the interpreter tears down (threads joined, atexit
hooks, grpc's own cleanup). Whoever stops it waits a bounded time before
SIGKILL (Kubernetes' ``terminationGracePeriodSeconds``, ``disagg up``'s stop
timeout), and a SIGKILL leaves no trace of what hung. So once the shutdown
begins, a daemon timer runs beside it; still alive at ``deadline_s``, it writes
every thread's stack to stderr and ends the process itself: exit 0 when the
orderly part had finished (only the teardown hung), 1 when it had not.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading


class ShutdownDeadline:
    def __init__(self, service: str, deadline_s: float) -> None:
        self._service = service
        self._deadline_s = deadline_s
        self._drained = False
        self._timer: threading.Timer | None = None

    def start(self) -> ShutdownDeadline:
        """Arms the timer (at the start of the shutdown); returns self."""
        self._timer = threading.Timer(self._deadline_s, self._expire)
        self._timer.daemon = True  # never what keeps the process alive
        self._timer.start()
        return self

    def drained(self) -> None:
        """The orderly part is done: what may still hang is the runtime's teardown."""
        self._drained = True

    def _expire(self) -> None:
        # Straight to the file descriptor: the hung thread may hold a logging lock.
        stage = "the runtime's teardown" if self._drained else "the orderly shutdown"
        line = (
            f"{self._service}: {stage} still running {self._deadline_s:g}s after the stop "
            "began; exiting now (every thread's stack follows)\n"
        )
        os.write(sys.stderr.fileno(), line.encode())
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(0 if self._drained else 1)
