"""Which threads run torch's CPU work in parallel: the engine's step thread, alone.

OpenMP (torch's CPU threads) keeps a team of worker threads for every thread
that ever ran a parallel region, for that thread's whole life. With more
OpenMP threads than cores, libgomp spins 1,000 times instead of 300,000
before a worker sleeps (``GOMP_SPINCOUNT`` does not raise that), and every
parallel region of a step -- GEMMs, fused glue, the decode kernel, ~270 of
them a step for SmolLM2 -- then wakes its workers through the kernel.
Measured on 2 cores (32 x 128 -> 128): ~89,000 context switches a run and
0.7x the decode tok/s with a second team (docs/adr/0006, "OpenMP teams"). So:

- the engine's setup (loading, warm-up) runs on a thread that ends with it
  (``on_passing_thread``): the team goes with the thread;
- other long-lived threads of a worker that touch tensors (the event loop:
  KV chunk writes, wipes; asyncio's executor: the finite checks of imported
  KV) run their torch ops on themselves alone (``serial_here`` / ``serial``):
  they never start a team.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")

# torch's libgomp is loaded into the global namespace (libtorch_global_deps);
# absent (another threading backend), there are no teams to avoid.
_omp_set_num_threads = getattr(ctypes.CDLL(None), "omp_set_num_threads", None)


def on_passing_thread(fn: Callable[[], None]) -> None:
    """fn() on a thread that ends with it; its exception is re-raised here."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as e:  # re-raised on the caller's thread
            failure.append(e)

    t = threading.Thread(target=run, name="disagg-engine-setup", daemon=True)
    t.start()
    t.join()
    if failure:
        raise failure[0]


def serial_here() -> None:
    """From now on this thread's torch CPU ops run on it alone (never an OpenMP team).

    Not for a thread that steps a model: its GEMMs would lose the other cores."""
    torch.get_num_threads()  # torch sets a thread's OpenMP count on first use: let it, then override
    if _omp_set_num_threads is not None:
        _omp_set_num_threads(1)


def serial(fn: Callable[P, R]) -> Callable[P, R]:
    """fn, run after ``serial_here`` (for ``asyncio.to_thread`` / executors)."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        serial_here()
        return fn(*args, **kwargs)

    return run
