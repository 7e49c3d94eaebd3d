"""`disagg up --cpu-affinity ROLE=CPUS`: parsing, and the worker argv it produces."""

from __future__ import annotations

import pytest

from disagg.launcher import _pinned, parse_cpu_affinity


def test_parse_cpu_affinity() -> None:
    assert parse_cpu_affinity(["prefill=0", "decode=1,2"]) == {"prefill": "0", "decode": "1,2"}
    assert parse_cpu_affinity([]) == {}
    for bad in (["prefill"], ["scheduler=0"], ["decode="]):
        with pytest.raises(ValueError):
            parse_cpu_affinity(bad)


def test_pinned_argv_runs_under_taskset() -> None:
    assert _pinned(["python", "-m", "x"], "1") == ["taskset", "-c", "1", "python", "-m", "x"]
    assert _pinned(["python"], None) == ["python"]


def test_up_refuses_a_bad_affinity(capsys: pytest.CaptureFixture[str]) -> None:
    from disagg.cli import main

    assert main(["up", "--cpu-affinity", "gpu=0"]) == 2
    assert "cpu-affinity" in capsys.readouterr().err
