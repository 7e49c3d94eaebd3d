"""The supervisor over real child processes: restart with backoff, count, give up on a loop."""

from __future__ import annotations

import io
import sys
import time

import pytest

from disagg.runtime.procs import ServiceGroup
from disagg.runtime.supervisor import RestartPolicy, Supervisor

EXIT_AT_ONCE = [sys.executable, "-c", "import sys; sys.exit(3)"]
STAY_UP = [sys.executable, "-c", "import time; time.sleep(60)"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _poll_until(sup: Supervisor, predicate, timeout_s: float = 10.0) -> str | None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        verdict = sup.poll()
        if verdict is not None or predicate():
            return verdict
        time.sleep(0.02)
    raise AssertionError("condition not reached")


def test_policy_backoff_doubles_and_is_capped() -> None:
    p = RestartPolicy(backoff_s=0.5, max_backoff_s=3.0)
    assert [p.delay(n) for n in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    with pytest.raises(ValueError):
        RestartPolicy(backoff_s=2.0, max_backoff_s=1.0)


def test_exited_service_restarts_after_its_backoff_and_is_counted() -> None:
    clock, out, seen = Clock(), io.StringIO(), []
    with ServiceGroup(out=io.StringIO()) as group:
        sup = Supervisor(
            group,
            RestartPolicy(backoff_s=5.0, max_restarts=3),
            on_restart=lambda name, n: seen.append((name, n)),
            out=out,
            clock=clock,
        )
        sup.add("flaky", EXIT_AT_ONCE)
        sup.add("steady", STAY_UP)
        first = group.pids["flaky"]
        _poll_until(sup, lambda: "restarting in 5s" in out.getvalue())
        for _ in range(5):  # not due yet: nothing respawned
            assert sup.poll() is None
            time.sleep(0.02)
        assert group.pids["flaky"] == first and seen == []
        clock.now += 5.0
        assert sup.poll() is None
        assert group.pids["flaky"] != first and seen == [("flaky", 1)]
        assert sup.restarts("flaky") == 1 and sup.restarts("steady") == 0
        assert "flaky exited with code 3; restarting in 5s (restart 1)" in out.getvalue()
        assert "steady" in group.running()
        # the second exit inside the window waits twice as long
        _poll_until(sup, lambda: "restarting in 10s (restart 2)" in out.getvalue())


def test_more_exits_than_allowed_within_the_window_is_a_crash_loop() -> None:
    clock = Clock()
    with ServiceGroup(out=io.StringIO()) as group:
        sup = Supervisor(
            group, RestartPolicy(backoff_s=0.0, max_restarts=2), out=io.StringIO(), clock=clock
        )
        sup.add("broken", EXIT_AT_ONCE)
        verdict = _poll_until(sup, lambda: False)
        assert verdict is not None
        assert verdict.startswith("broken exited 3 times within 60s (last code 3): crash loop")
        assert sup.restarts("broken") == 2


def test_exits_spread_beyond_the_window_are_not_a_loop() -> None:
    clock = Clock()
    with ServiceGroup(out=io.StringIO()) as group:
        sup = Supervisor(
            group,
            RestartPolicy(backoff_s=0.0, window_s=10.0, max_restarts=1),
            out=io.StringIO(),
            clock=clock,
        )
        sup.add("rare", EXIT_AT_ONCE)
        for n in range(1, 4):  # each exit 11 s after the last: always the only one in its window
            _poll_until(sup, lambda n=n: sup.restarts("rare") == n)
            clock.now += 11.0
        assert sup.restarts("rare") == 3
