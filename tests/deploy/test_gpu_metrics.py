"""GPU gauges on a worker's /metrics: present with a GPU, plainly absent without one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from prometheus_client import generate_latest

from disagg.metastore.embedded import EmbeddedValkey
from disagg.metrics import names
from disagg.metrics.scrape import parse
from disagg.metrics.worker import worker_registry
from disagg.runtime import telemetry
from disagg.runtime.telemetry import GpuSample, nvml_device


def _scrape(sample: GpuSample) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = generate_latest(worker_registry("prefill-x", lambda: None, "prefill", lambda: sample))
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for (name, labels), value in parse(text.decode()).items():
        out.setdefault(name, []).append((dict(labels), value))
    return out


def test_without_gpu_only_availability_zero_is_exposed() -> None:
    got = _scrape(GpuSample(available=False, reason="NVML init failed: no driver"))
    assert got[names.GPU_AVAILABLE] == [({"worker": "prefill-x", "role": "prefill"}, 0.0)]
    assert not [n for n in got if n.startswith("disagg:gpu_") and n != names.GPU_AVAILABLE]


def test_with_gpu_each_reported_metric_is_a_labelled_gauge() -> None:
    sample = GpuSample(
        available=True,
        reason="not reported: power: Not Supported",
        name="NVIDIA H100 80GB HBM3",
        utilization_pct=87.0,
        memory_used_bytes=30 << 30,
        memory_total_bytes=80 << 30,
        sm_clock_mhz=1980,
        power_w=None,  # this board does not report power: no sample, not a 0
    )
    got = _scrape(sample)
    labels = {"worker": "prefill-x", "role": "prefill", "gpu": "NVIDIA H100 80GB HBM3"}
    assert got[names.GPU_AVAILABLE][0][1] == 1.0
    assert got[names.GPU_UTILIZATION] == [(labels, 87.0)]
    assert got[names.GPU_MEMORY_USED] == [(labels, float(30 << 30))]
    assert got[names.GPU_MEMORY_TOTAL] == [(labels, float(80 << 30))]
    assert got[names.GPU_SM_CLOCK] == [(labels, 1980.0)]
    assert names.GPU_POWER not in got
    pb = sample.to_pb()  # the heartbeat's form keeps the reason
    assert pb.available and pb.utilization_pct == 87.0 and "power" in pb.unavailable_reason


def test_nvml_device_follows_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert nvml_device("cuda:2") == 2 and nvml_device("auto") == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert nvml_device("cuda") == 3 and nvml_device("cuda:1") == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f2c,GPU-11aa")
    assert nvml_device("cuda:1") == "GPU-11aa"


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl"), reason="this machine has an NVIDIA GPU")
def test_real_nvml_absence_and_gpu_command() -> None:
    sample = telemetry.read_gpu_sample()
    assert not sample.available and sample.reason
    assert sample.utilization_pct is None and sample.memory_total_bytes is None
    out = subprocess.run(
        [sys.executable, "-m", "disagg.cli", "gpu"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1 and "no GPU telemetry" in out.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not os.path.exists("/dev/nvidiactl"), reason="needs an NVIDIA GPU")
def test_gpu_gauges_on_a_gpu_host() -> None:
    sample = telemetry.read_gpu_sample(nvml_device("cuda"))
    assert sample.available, sample.reason
    got = _scrape(sample)
    assert got[names.GPU_AVAILABLE][0][1] == 1.0
    (labels, util), *_ = got[names.GPU_UTILIZATION]
    assert 0.0 <= util <= 100.0 and labels["gpu"]
    (_, used), *_ = got[names.GPU_MEMORY_USED]
    (_, total), *_ = got[names.GPU_MEMORY_TOTAL]
    assert 0 < used <= total
    out = subprocess.run(
        [sys.executable, "-m", "disagg.cli", "gpu"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not os.path.exists("/dev/nvidiactl"), reason="needs an NVIDIA GPU")
def test_worker_on_gpu_reports_telemetry(tiny_model: str, valkey: EmbeddedValkey) -> None:
    """A real prefill and decode worker on CUDA: GPU in the heartbeat and on /metrics."""
    import urllib.request

    from disagg.v1 import scheduler_pb2
    from tests.cluster import Cluster

    cluster = Cluster(
        tiny_model,
        valkey.url,
        engine={"device": "cuda", "dtype": "bfloat16"},
        worker={"metrics_port": 0},
    ).start()
    try:
        ids, _, _ = cluster.generate(prompt_token_ids=[5, 17, 42, 99], max_tokens=8, temperature=0)
        assert len(ids) == 8
        infos = cluster.stub().ListWorkers(scheduler_pb2.ListWorkersRequest()).workers
        assert infos and all(w.gpu.available and w.gpu.memory_total_bytes > 0 for w in infos)
        for host in cluster.hosts:
            url = f"http://127.0.0.1:{host.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as resp:
                samples = parse(resp.read().decode())
            util = [lab for (n, lab), _ in samples.items() if n == names.GPU_UTILIZATION]
            assert util and dict(util[0])["role"] == host.cfg.role
    finally:
        cluster.stop()


@pytest.mark.skipif(os.path.exists("/dev/nvidiactl"), reason="this machine has an NVIDIA GPU")
def test_gpu_check_script_says_no_gpu_and_fails() -> None:
    from tests.deploy.helpers import REPO

    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "no NVIDIA GPU on this machine" in out.stderr
