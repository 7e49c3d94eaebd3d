"""ServiceGroup: no child survives terminate_all; deaths are noticed; output is prefixed."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time

import pytest

from disagg.runtime.procs import ServiceExited, ServiceGroup

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for init to reap it is dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_terminate_all_leaves_no_child() -> None:
    group = ServiceGroup(out=io.StringIO())
    a = group.spawn("a", SLEEPER)
    b = group.spawn("b", SLEEPER)
    assert group.wait_any(timeout_s=0.2) is None
    assert sorted(group.running()) == ["a", "b"]

    codes = group.terminate_all(timeout_s=5)
    assert codes == {"a": -15, "b": -15}
    for pid in (a.pid, b.pid):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_sigkill_after_timeout_and_grandchildren() -> None:
    # Ignores SIGTERM and has a child of its own in its process group.
    stubborn = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
        "print(p.pid, flush=True); time.sleep(60)"
    )
    out = io.StringIO()
    group = ServiceGroup(out=out)
    parent = group.spawn("stubborn", [sys.executable, "-c", stubborn])
    assert group.wait_until(lambda: bool(group.tail("stubborn")), timeout_s=10)
    grandchild = int(group.tail("stubborn")[0])

    started = time.monotonic()
    assert group.terminate_all(timeout_s=0.5) == {"stubborn": -9}
    assert time.monotonic() - started < 5
    assert not _alive(parent.pid)
    deadline = time.monotonic() + 2
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)
    assert out.getvalue().startswith("[stubborn] ")


def test_death_is_noticed_with_output() -> None:
    with ServiceGroup(out=io.StringIO()) as group:
        group.spawn("sleeper", SLEEPER)
        group.spawn("crasher", [sys.executable, "-c", "import sys; sys.exit('bad config')"])
        with pytest.raises(ServiceExited) as info:
            group.wait_until(lambda: False, timeout_s=10)
        assert info.value.exited.name == "crasher"
        assert info.value.exited.returncode == 1
        assert "bad config" in str(info.value)
        assert group.wait_any(timeout_s=0.1) is None  # each exit is reported once
    assert group.running() == []


def test_children_keep_running_when_our_output_breaks() -> None:
    """A launcher whose stderr pipe was closed must keep draining its children's output:
    a child writing more than a pipe buffer would otherwise block forever."""
    r, w = os.pipe()
    os.close(r)  # nobody reads our output: every write fails with EPIPE
    broken = os.fdopen(w, "w")
    chatty = "import sys\nfor i in range(20000): print('line', i)\nprint('done')"
    with ServiceGroup(out=broken) as group:
        proc = group.spawn("chatty", [sys.executable, "-c", chatty])
        assert proc.wait(timeout=30) == 0
        exited = group.wait_any(timeout_s=5)
        assert exited is not None and exited.returncode == 0
        assert group.tail("chatty")[-1] == "done"
    with contextlib.suppress(OSError):
        broken.close()
