"""A deadline on a service's shutdown: the process ends within a bound, whatever hangs.

A service stops in order (NOT_SERVING, streams drained for their grace, clients
and stores closed), then the interpreter tears down (threads joined, atexit
hooks, grpc's own cleanup). Whoever stops it waits a bounded time before
SIGKILL (Kubernetes' ``terminationGracePeriodSeconds``, ``disagg up``'s stop
timeout), and a SIGKILL leaves no trace of what hung. So once the shutdown
begins, a daemon timer runs beside it; still alive at ``deadline_s``, it writes
every thread's stack to stderr -- and, given the service's event loop, the
stack of every task still on it, which is where an await that never returns
shows -- and ends the process itself: exit 0 when the orderly part had finished
(only the teardown hung), 1 when it had not.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import sys
import threading


class ShutdownDeadline:
    def __init__(
        self, service: str, deadline_s: float, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self._service = service
        self._deadline_s = deadline_s
        self._loop = loop
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
        if self._loop is not None:
            self._dump_tasks(self._loop)
        os._exit(0 if self._drained else 1)

    @staticmethod
    def _dump_tasks(loop: asyncio.AbstractEventLoop) -> None:
        """The loop's tasks and where each awaits (read from this timer thread while the
        loop is stuck: a diagnostic on the way out, so a race is tolerated)."""
        try:
            tasks = list(asyncio.all_tasks(loop))
            os.write(sys.stderr.fileno(), f"{len(tasks)} tasks on the event loop:\n".encode())
            for task in tasks:
                task.print_stack(file=sys.stderr)
            sys.stderr.flush()
        except Exception as e:  # the loop changed under us: the thread stacks stand
            os.write(sys.stderr.fileno(), f"(tasks not listed: {e!r})\n".encode())


async def cancel_and_wait(task: asyncio.Task[None] | None) -> None:
    """Cancels a service's background task and waits for it to end.

    The task's loop must also check a stop flag set before this call. redis-py can
    turn a cancel that lands mid-command into a ConnectionError; a loop that takes
    that for an outage and goes on would never end. The task's own CancelledError
    is swallowed. A cancel aimed at the caller, which is stopping, is raised."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
