"""Telemetry without a GPU, one-line logs, ids."""

from __future__ import annotations

import io
import logging
import os
import re

import pytest

from disagg.metastore.keys import check_id
from disagg.runtime import telemetry
from disagg.runtime.ids import default_worker_id, new_request_id
from disagg.runtime.logs import setup_logging


def _has_nvidia_gpu() -> bool:
    return os.path.exists("/dev/nvidiactl")


@pytest.mark.skipif(_has_nvidia_gpu(), reason="this machine has an NVIDIA GPU")
def test_telemetry_without_gpu_is_unavailable_not_an_error() -> None:
    for _ in range(2):  # the second call uses the cached init failure
        t = telemetry.read_gpu_telemetry()
        assert t.available is False
        assert t.unavailable_reason
        assert (t.utilization_pct, t.memory_total_bytes, t.power_w) == (0, 0, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_nvidia_gpu(), reason="needs an NVIDIA GPU")
def test_telemetry_with_gpu() -> None:
    t = telemetry.read_gpu_telemetry()
    assert t.available, t.unavailable_reason
    assert t.name and t.memory_total_bytes > t.memory_used_bytes > 0
    bad = telemetry.read_gpu_telemetry(device_index=999)
    assert not bad.available and bad.unavailable_reason


def test_one_line_structured_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setenv("DISAGG_LOG_LEVEL", "warning")
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    try:
        setup_logging("prefill", stream=out)
        setup_logging("prefill", stream=out)  # idempotent: still one handler of ours
        log = logging.getLogger("disagg.test")
        log.info("hidden")
        log.warning("lease expired", extra={"request_id": "r1", "note": "two words"})
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    finally:
        for h in root.handlers[:]:
            if h not in saved[1]:
                root.removeHandler(h)
        root.setLevel(saved[0])
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    pattern = (
        r"\S+Z WARNING prefill lease expired request_id=r1 note=\"two words\" logger=disagg.test"
    )
    assert re.fullmatch(pattern, lines[0]), lines[0]
    assert lines[1].startswith(lines[1].split()[0] + " ERROR prefill failed")
    assert "ValueError: boom" in lines[1]


def test_ids() -> None:
    a, b = new_request_id(), new_request_id()
    assert a != b and re.fullmatch(r"[0-9a-f]{32}", a)
    wid = default_worker_id("decode")
    assert wid.startswith("decode-") and f"-{os.getpid()}-" in wid
    assert re.search(r"-[0-9a-f]{4}$", wid)
    assert check_id(wid) == wid and check_id(a) == a
