"""GPU telemetry from NVML (nvidia-ml-py), for the worker's heartbeat record.

Contract: ``read_gpu_telemetry`` never raises and never invents a number.
Where NVML, the driver or the device is missing it returns
``available=False`` with the NVML error text in ``unavailable_reason``. With
``available=True``, a metric the device does not report (e.g. power on some
boards) is left at 0 and named in ``unavailable_reason``.

NVML is initialised once per process; a failed initialisation is cached, so
a machine without a GPU pays for the attempt once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

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


def _unavailable(reason: str) -> common_pb2.GpuTelemetry:
    return common_pb2.GpuTelemetry(available=False, unavailable_reason=reason or "unknown")


def _decoded(name: str | bytes) -> str:
    return name.decode() if isinstance(name, bytes) else name


def _fill_metrics(handle: object, out: common_pb2.GpuTelemetry) -> list[str]:
    """Sets each metric NVML reports; returns the names of those it did not."""
    assert pynvml is not None

    def util() -> None:
        out.utilization_pct = float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)

    def memory() -> None:
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        out.memory_used_bytes, out.memory_total_bytes = int(mem.used), int(mem.total)

    def clock() -> None:
        out.sm_clock_mhz = int(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))

    def power() -> None:
        out.power_w = pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0  # milliwatts

    probes: dict[str, Callable[[], None]] = {
        "utilization": util,
        "memory": memory,
        "sm_clock": clock,
        "power": power,
    }
    missing = []
    for name, probe in probes.items():
        try:
            probe()
        except Exception as e:
            missing.append(f"{name}: {e}")
    return missing


def read_gpu_telemetry(device_index: int = 0) -> common_pb2.GpuTelemetry:
    """A snapshot of device device_index (see the module contract). Never raises."""
    reason = _init_nvml()
    if reason is not None:
        return _unavailable(reason)
    assert pynvml is not None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        out = common_pb2.GpuTelemetry(
            available=True, name=_decoded(pynvml.nvmlDeviceGetName(handle))
        )
    except Exception as e:
        return _unavailable(f"NVML device {device_index}: {e}")
    missing = _fill_metrics(handle, out)
    if missing:
        out.unavailable_reason = "not reported: " + "; ".join(missing)
    return out
