"""The engine's torch work before its step thread runs on a thread that exits.

OpenMP keeps a team of worker threads per thread that ever ran a parallel
region; two teams on a host's cores make libgomp sleep and wake its workers
around every parallel region of a step (disagg/engine/threads.py says why).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from disagg.engine.threads import on_passing_thread

# Builds an engine on the main thread as a server does, then counts the
# process's voluntary context switches over a decode run.
_SCRIPT = r"""
import json, os, sys, threading
from disagg.engine.api import EngineRequest, SamplingParams
from disagg.engine.config import EngineConfig
from disagg.engine.engine import LLMEngine

threads = os.cpu_count() or 1
eng = LLMEngine(EngineConfig(model=sys.argv[1], dtype="float32", device="cpu", threads=threads,
                             block_size=16, num_blocks=64, max_num_seqs=8, compile=False))
eng.start()

def switches():
    total = 0
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/status") as f:
            total += sum(int(l.split()[1]) for l in f if l.startswith("voluntary_ctxt"))
    return total

def run(n, tag):
    done, left = threading.Event(), [n]
    def on_output(out):
        if out.finish is not None:
            left[0] -= 1
            if not left[0]:
                done.set()
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    for i in range(n):
        eng.submit(EngineRequest(f"{tag}{i}", list(range(100 + i, 140 + i)), params, on_output))
    assert done.wait(300)

run(2, "warm")
before = switches()
run(8, "r")
print(json.dumps({"switches": switches() - before, "threads": threads}))
eng.stop()
"""


def test_passing_thread_runs_elsewhere_and_ends() -> None:
    seen: list[threading.Thread] = []
    on_passing_thread(lambda: seen.append(threading.current_thread()))
    assert seen and seen[0] is not threading.current_thread()
    assert not seen[0].is_alive()


def test_passing_thread_reraises() -> None:
    def fail() -> None:
        raise ValueError("bad checkpoint")

    with pytest.raises(ValueError, match="bad checkpoint"):
        on_passing_thread(fail)


# In a fresh process (the suite's own global torch thread count is whatever
# other tests set): the thread count torch's ops see on a plain thread, on a
# ``serial`` one, and on the main thread after both ran.
_TEAM_SCRIPT = r"""
import json, threading, torch
from disagg.engine.threads import serial
torch.set_num_threads(2)
x = torch.arange(4_000_000, dtype=torch.float64)
seen = {}
def work(name):
    seen[name + "-sum"] = float(x.sum())  # parallel where it may be: far above the grain size
    seen[name] = torch.get_num_threads()
for name, fn in (("serial", serial(work)), ("plain", work)):
    t = threading.Thread(target=fn, args=(name,))
    t.start()
    t.join()
seen["main"] = torch.get_num_threads()
print(json.dumps(seen))
"""


def test_serial_thread_runs_its_ops_alone() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _TEAM_SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["serial"] == 1, seen  # its ops never start a team
    assert seen["plain"] == 2 and seen["main"] == 2, seen  # nobody else's count changed
    assert seen["serial-sum"] == seen["plain-sum"] == 4_000_000 * 3_999_999 / 2, seen


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_decode_steps_do_not_wake_threads_through_the_kernel(smollm_path: str) -> None:
    # 8 rows x 24 tokens on every core: ~25 steps of ~270 parallel regions each.
    # With a second OpenMP team left on the main thread this counted thousands
    # of switches (each region's worker slept and was woken); with one team, a few.
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, smollm_path],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["switches"] < 500, result
