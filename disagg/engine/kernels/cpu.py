"""The CPU decode-attention kernel (``paged_decode.cpp``): built once, loaded with ctypes.

Decode attention reads each row's K and V straight from the pool by block
table. Written in torch ops and compiled by inductor (``paged_attention.
fused_decode``) it spent ~1.8 ms a layer at batch 32 x 192 tokens on this
machine, most of it per-element index arithmetic and horizontal reductions;
this kernel does the same work in one pass over K and one over V
(docs/adr/0006, "Decode attention kernel").

Built with the C++ compiler inductor already needs (``g++``), at first use,
into ``$DISAGG_KERNEL_CACHE`` (default ``~/.cache/disagg/kernels``), keyed by
the source, the compiler and the CPU's flags (``-march=native``); about a
second, then loaded from the cache. The library's OpenMP symbols resolve to
the runtime torch loaded, so the kernel runs on torch's threads. fp32 pools
only; anything else, or no compiler, and ``available()`` says why not and the
caller keeps its torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("paged_decode.cpp")
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c++17"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_why_not: str | None = None
_loaded = False

_i64, _f32p = ctypes.c_int64, ctypes.c_void_p


def _cache_dir() -> Path:
    base = os.environ.get("DISAGG_KERNEL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "disagg", "kernels"
    )
    return Path(base)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return ""


def _build(cxx: str) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\0".join([_SRC.read_text(), version, _cpu_flags(), " ".join(_FLAGS)]).encode()
    ).hexdigest()[:16]
    name = f"paged_decode-{key}.so"
    target = _cache_dir() / name
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # a read-only home (containers): this process's temporary directory
        target = Path(tempfile.gettempdir()) / "disagg-kernels" / name
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / "k.o", Path(tmp) / "k.so"
        # Compiled with -ffast-math but linked without it: linking with it would
        # add crtfastmath.o, which sets flush-to-zero for the whole process.
        subprocess.run([cxx, *_FLAGS, "-c", str(_SRC), "-o", str(obj)], check=True)
        subprocess.run([cxx, "-shared", "-fopenmp", str(obj), "-o", str(lib)], check=True)
        os.replace(lib, target)  # atomic: a concurrent builder's copy is equally good
    return target


def _load() -> None:
    global _lib, _why_not, _loaded
    with _lock:
        if _loaded:
            return
        _loaded = True
        cxx = shutil.which("g++") or shutil.which("c++")
        if cxx is None:
            _why_not = "no C++ compiler (g++) on PATH"
            return
        try:
            lib = ctypes.CDLL(str(_build(cxx)))
        except (OSError, subprocess.CalledProcessError) as e:
            _why_not = f"build failed: {e}"
            log.warning("CPU decode-attention kernel unavailable (%s)", _why_not)
            return
        fn = lib.disagg_paged_decode_f32
        fn.restype = ctypes.c_int
        fn.argtypes = [_f32p] * 6 + [_i64] * 6 + [ctypes.c_float, _i64, ctypes.c_int]
        _lib = lib


def available(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the kernel serves this pool; else why not."""
    if device.type != "cpu":
        return f"device {device.type}"
    if dtype != torch.float32:
        return f"dtype {dtype}"
    _load()
    return _why_not


def paged_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    window: int,
) -> torch.Tensor:
    """q [b, H, d] over each row's pool blocks -> [b, H, d]; ``fused_decode``'s contract.

    Every id in ``table`` must be a block of the pool and every length within
    the table's width (the runner builds both; the kernel does not check ids)."""
    assert _lib is not None, "paged_decode before available() said yes"
    b, heads, d = q.shape
    _, bs, kv_heads, _ = k_cache.shape
    q = q.contiguous()
    table, lens = table.contiguous(), lens.contiguous()
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("the pool's K and V must be contiguous")
    tensors = (q, k_cache, v_cache, table, lens)
    if any(t.device.type != "cpu" for t in tensors):
        raise ValueError("paged_decode runs on CPU tensors")
    if {q.dtype, k_cache.dtype, v_cache.dtype} != {torch.float32} or {table.dtype, lens.dtype} != {
        torch.int64
    }:
        raise ValueError("paged_decode takes float32 q / K / V and int64 tables and lengths")
    if (
        k_cache.shape != v_cache.shape
        or k_cache.shape[3] != d
        or table.shape[0] != b
        or lens.shape != (b,)
    ):
        raise ValueError("paged_decode: q, pool, table and lengths disagree in shape")
    out = torch.empty_like(q)
    rc = _lib.disagg_paged_decode_f32(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        table.data_ptr(),
        lens.data_ptr(),
        out.data_ptr(),
        b,
        heads,
        kv_heads,
        d,
        bs,
        table.shape[1],
        scale,
        window,
        torch.get_num_threads(),
    )
    if rc != 0:
        raise ValueError(f"paged decode kernel refused its arguments (code {rc})")
    return out
