"""benchmarks/engine.py runs end to end in --quick mode and writes every key (no speed assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KEYS = (
    "engine_tok_s",
    "engine_total_tok_s",
    "hf_generate_batch_tok_s",
    "hf_generate_tok_s",
    "bare_forward_tok_s",
    "prefill_2048_tok_s",
    "prefill_2048_chunked_tok_s",
    "bare_prefill_2048_tok_s",
    "engine_vs_generate_batch",
    "engine_vs_bare",
    "prefill_vs_bare",
    "peak_rss_mb",
    # the old (transformers modules) path beside the native one, same run
    "engine_transformers_tok_s",
    "engine_transformers_total_tok_s",
    "engine_transformers_prefill_2048_tok_s",
    "engine_transformers_vs_bare",
    "engine_transformers_vs_generate",
    "native_vs_transformers",
    # decode at batch 1 against the bare forward at batch 1
    "engine_b1_tok_s",
    "engine_transformers_b1_tok_s",
    "bare_b1_tok_s",
    "engine_vs_bare_b1",
)


def test_benchmark_quick_writes_every_key(tiny_model: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    out, prof = tmp_path / "bench.json", tmp_path / "profile.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "engine.py"), "--quick"]
    cmd += ["--model", tiny_model, "--json", str(out), "--profile-out", str(prof)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in KEYS:
        assert isinstance(res[key], float) and res[key] > 0, key
    assert "native: engine decode" in proc.stdout  # the table
    assert res["compile"]["enabled"] and res["compile"]["first_step_s"]
    assert set(res["same_round"]) >= {"engine_vs_bare", "engine_transformers_vs_bare"}
    p = json.loads(prof.read_text())
    assert p["kv_bytes_per_token"] > 0
    assert p["prefill"] and all(r["tokens"] > 0 and r["ms"] > 0 for r in p["prefill"])
    assert p["decode"] and all(r["step_ms"] > 0 for r in p["decode"])
