"""A service process whose shutdown hangs still ends within its deadline, and says where.

Real processes: each starts the deadline, then hangs the way a stuck shutdown
does (an orderly part that never returns; or a non-daemon thread that keeps the
interpreter from exiting after the orderly part finished).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    from disagg.runtime.shutdown import ShutdownDeadline

    def stuck_in_close():
        time.sleep(60)

    deadline = ShutdownDeadline("svc", 0.5).start()
    if sys.argv[1] == "orderly":
        stuck_in_close()  # the orderly shutdown never returns
    else:
        deadline.drained()
        threading.Thread(target=stuck_in_close).start()  # non-daemon: exit waits on it
    """
)


@pytest.mark.parametrize(("where", "code", "stage"), [
    ("orderly", 1, "the orderly shutdown"),
    ("teardown", 0, "the runtime's teardown"),
])  # fmt: skip
def test_a_hung_shutdown_ends_at_its_deadline_with_the_stacks(
    where: str, code: int, stage: str
) -> None:
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, where], capture_output=True, text=True, timeout=30
    )
    took = time.monotonic() - start
    assert run.returncode == code, run.stderr
    assert took < 20, f"took {took:.1f}s: the deadline did not end it"
    assert f"svc: {stage} still running 0.5s after the stop began" in run.stderr
    assert "stuck_in_close" in run.stderr  # the stack says where it hung


def test_a_shutdown_that_finishes_is_not_cut_short() -> None:
    script = (
        "from disagg.runtime.shutdown import ShutdownDeadline\n"
        "ShutdownDeadline('svc', 5.0).start().drained()\n"
        "print('done')\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0 and run.stdout.strip() == "done" and not run.stderr


def test_a_hung_await_shows_in_the_tasks_stacks() -> None:
    script = textwrap.dedent(
        """
        import asyncio
        from disagg.runtime.shutdown import ShutdownDeadline

        async def awaits_forever():
            await asyncio.Event().wait()

        async def main():
            ShutdownDeadline("svc", 0.5, asyncio.get_running_loop()).start()
            await asyncio.gather(awaits_forever(), asyncio.sleep(60))

        asyncio.run(main())
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30)
    assert run.returncode == 1, run.stderr
    assert "tasks on the event loop" in run.stderr
    assert "awaits_forever" in run.stderr  # the coroutine's await, not only the thread's select
