"""GPU telemetry from NVML (nvidia-ml-py), for the worker's heartbeat record.

Contract: ``read_gpu_telemetry`` never raises and never invents a number.
Where NVML, the driver or the device is missing it returns
``available=False`` with the NVML error text in ``unavailable_reason``. With
``available=True``, a metric the device does not report (e.g. power on some
boards) is left at 0 and named in ``unavailable_reason``.

``read_gpu_sample`` is the same snapshot as a value object whose metrics
are ``None`` when not reported (what /metrics exposes: no sample rather than
a 0). ``nvml_device`` maps a torch device string (``cuda:N``, honouring
``CUDA_VISIBLE_DEVICES``) to the NVML index or UUID of that GPU.

NVML is initialised once per process; a failed initialisation is cached, so
a machine without a GPU pays for the attempt once.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from disagg.v1 import common_pb2

try:
    import pynvml
except ImportError as e:  # nvidia-ml-py is a dependency, but stay total
    pynvml = None
    _IMPORT_ERROR = f"pynvml not importable: {e}"

_lock = threading.Lock()
_init_done = False
_init_error: str | None = None


def _init_nvml() -> str | None:
    """None once NVML is usable; the (cached) reason it is not otherwise."""
    global _init_done, _init_error
    with _lock:
        if not _init_done:
            _init_done = True
            if pynvml is None:
                _init_error = _IMPORT_ERROR
            else:
                try:
                    pynvml.nvmlInit()
                except Exception as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
                    _init_error = f"NVML init failed: {e}"
        return _init_error


@dataclass(frozen=True)
class GpuSample:
    """One NVML snapshot; a metric the device did not report is None, never a made-up 0."""

    available: bool
    reason: str = ""  # why unavailable, or which metrics were not reported
    name: str = ""
    utilization_pct: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    sm_clock_mhz: int | None = None
    power_w: float | None = None

    def to_pb(self) -> common_pb2.GpuTelemetry:
        """The heartbeat form (proto3 has no None: unreported metrics stay 0, named in the reason)."""
        out = common_pb2.GpuTelemetry(
            available=self.available, name=self.name, unavailable_reason=self.reason
        )
        for field in (
            "utilization_pct",
            "memory_used_bytes",
            "memory_total_bytes",
            "sm_clock_mhz",
            "power_w",
        ):
            value = getattr(self, field)
            if value is not None:
                setattr(out, field, value)
        return out


def nvml_device(device: str = "auto") -> int | str:
    """The NVML index (or UUID) of the GPU that torch calls device ("cuda:N", "cuda", "auto").

    NVML numbers every GPU of the host; CUDA numbers those in CUDA_VISIBLE_DEVICES.
    """
    ordinal = int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0
    visible = [
        v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()
    ]
    if ordinal >= len(visible):
        return ordinal
    entry = visible[ordinal]
    return int(entry) if entry.isdigit() else entry


def _handle(device: int | str) -> object:
    assert pynvml is not None
    if isinstance(device, int):
        return pynvml.nvmlDeviceGetHandleByIndex(device)
    return pynvml.nvmlDeviceGetHandleByUUID(device)


def _decoded(name: str | bytes) -> str:
    return name.decode() if isinstance(name, bytes) else name


def _probe(handle: object) -> tuple[dict[str, float | int], list[str]]:
    """(metric -> value for each metric NVML reports, 'metric: error' for each it did not)."""
    assert pynvml is not None
    nvml = pynvml

    def util() -> dict[str, float | int]:
        return {"utilization_pct": float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)}

    def memory() -> dict[str, float | int]:
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        return {"memory_used_bytes": int(mem.used), "memory_total_bytes": int(mem.total)}

    def clock() -> dict[str, float | int]:
        return {"sm_clock_mhz": int(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM))}

    def power() -> dict[str, float | int]:
        return {"power_w": nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0}  # milliwatts

    probes: dict[str, Callable[[], dict[str, float | int]]] = {
        "utilization": util,
        "memory": memory,
        "sm_clock": clock,
        "power": power,
    }
    values: dict[str, float | int] = {}
    missing = []
    for name, probe in probes.items():
        try:
            values.update(probe())
        except Exception as e:
            missing.append(f"{name}: {e}")
    return values, missing


def read_gpu_sample(device: int | str = 0) -> GpuSample:
    """A snapshot of NVML device device (index or UUID; see the module contract). Never raises."""
    reason = _init_nvml()
    if reason is not None:
        return GpuSample(available=False, reason=reason)
    try:
        handle = _handle(device)
        name = _decoded(pynvml.nvmlDeviceGetName(handle))  # type: ignore[union-attr]
    except Exception as e:
        return GpuSample(available=False, reason=f"NVML device {device}: {e}")
    values, missing = _probe(handle)
    reason = "not reported: " + "; ".join(missing) if missing else ""
    return GpuSample(available=True, reason=reason, name=name, **values)  # type: ignore[arg-type]


def read_gpu_telemetry(device_index: int | str = 0) -> common_pb2.GpuTelemetry:
    """read_gpu_sample as the heartbeat's protobuf message. Never raises."""
    return read_gpu_sample(device_index).to_pb()
