"""The serving process's garbage collector: startup frozen out of collections, pauses timed.

In a child interpreter: the freeze is process-wide and permanent, not for the test's own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import gc, json
from disagg.runtime.gc_pauses import GcPauses, freeze_startup

startup = [[i] for i in range(50_000)]  # what imports and a tokenizer leave behind
freeze_startup()
frozen = gc.get_freeze_count()
seen = []
pauses = GcPauses(lambda gen, s: seen.append((gen, s))).install()
gc.collect()
after_full = list(seen)
pauses.remove()
gc.collect()
print(json.dumps({"frozen": frozen, "full": after_full, "after_remove": len(seen)}))
"""


def test_startup_objects_are_frozen_and_every_collection_is_timed() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True, check=True
    )
    got = json.loads(out.stdout)
    assert got["frozen"] >= 50_000  # startup's objects: no collection scans them again
    assert [g for g, _ in got["full"]] == [2]  # gc.collect(): one full collection, timed
    assert all(s >= 0 for _, s in got["full"])
    assert got["after_remove"] == 1  # removed: no longer timed
