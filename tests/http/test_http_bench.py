"""`disagg bench` against a running system agrees with the server's own metrics for the same run.

The cluster here runs a larger random model than the tiny one (~14 M parameters,
prefill of 100 tokens in tens of ms on CPU): with the tiny model the whole TTFT
is a few ms, and the fixed cost of HTTP on both ends (~1-2 ms) would dominate
the comparison of the client's TTFT with the server's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from disagg.metastore.embedded import EmbeddedValkey
from disagg.metrics import names
from disagg.metrics.scrape import delta
from tests.http.support import API_KEY, HttpCluster

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_model(chat_model: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 4-layer random Llama with the chat model's tokenizer (and template)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("bench") / "small-chat"
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    for f in os.listdir(chat_model):
        if f.startswith("tokenizer") or f.endswith(".jinja"):
            shutil.copy(os.path.join(chat_model, f), path)
    return str(path)


@pytest.fixture(scope="module")
def bench_cluster(small_model: str, valkey: EmbeddedValkey) -> Iterator[HttpCluster]:
    with redis.Redis.from_url(valkey.url) as r:
        r.flushall()
    cluster = HttpCluster(small_model, valkey.url)
    cluster.start()
    yield cluster
    cluster.stop()


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DISAGG_API_KEY": API_KEY}
    return subprocess.run(
        [sys.executable, "-m", "disagg.cli", "bench", "--disable-tqdm", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_bench_agrees_with_server(bench_cluster: HttpCluster, tmp_path: Path) -> None:
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    # A cold cluster (first prefills, first kernels) makes the first requests slow, and at
    # 20 req/s the queue they leave never drains within the run: seconds of TTFT, most of
    # it spent where only the client sees it. A few requests one at a time warm it first.
    warm = _bench(
        "--base-url",
        bench_cluster.base_url,
        "--num-prompts",
        "4",
        "--max-concurrency",
        "1",
        "--random-input-len",
        "100",
        "--random-output-len",
        "4",
    )
    assert warm.returncode == 0, warm.stderr
    before = bench_cluster.metrics()
    proc = _bench(
        "--base-url",
        bench_cluster.base_url,
        "--num-prompts",
        "24",
        "--request-rate",
        "20",
        "--random-input-len",
        "100",
        "--random-output-len",
        "12",
        "--random-range-ratio",
        "0.5",
        "--slo",
        "ttft_ms=2000,tpot_ms=500",
        "--json",
        str(out),
        "--plot",
        str(png),
        "--seed",
        "3",
    )
    assert proc.returncode == 0, proc.stderr
    after = bench_cluster.metrics()
    for line in (
        "Serving Benchmark Result",
        "Successful requests:",
        "Request goodput (req/s):",
        "Mean TTFT (ms):",
        "P99 TPOT (ms):",
        "Median ITL (ms):",
        "Mean E2EL (ms):",
    ):
        assert line in proc.stdout
    summary = json.loads(out.read_text())["summary"]
    assert summary["completed"] == 24 and summary["failed"] == 0
    assert delta(before, after, names.REQUESTS + "_total") == summary["completed"]
    assert delta(before, after, names.REJECTED + "_total") == summary["failed"]
    assert delta(before, after, names.TTFT + "_count") == summary["completed"]
    server_ttft_ms = (
        1000
        * delta(before, after, names.TTFT + "_sum")
        / delta(before, after, names.TTFT + "_count")
    )
    bench_ttft_ms = summary["ttft_ms"]["mean"]
    assert abs(bench_ttft_ms - server_ttft_ms) <= 0.2 * server_ttft_ms, (
        bench_ttft_ms,
        server_ttft_ms,
    )
    assert (
        summary["total_output"] == delta(before, after, names.ITL + "_count") + summary["completed"]
    )
    assert png.stat().st_size > 0
    bench_cluster.wait_no_leaks()


def test_bench_grpc_and_trace(bench_cluster: HttpCluster, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    lines = [
        {"prompt": "t5 t6 t7 t8", "output_len": 4, "timestamp": 0.0},
        {"prompt_token_ids": [11, 12, 13], "output_len": 3, "timestamp": 0.05},
        {"messages": [{"role": "user", "content": "t9 t10"}], "output_len": 2, "timestamp": 0.1},
    ]
    trace.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "grpc.json"
    proc = _bench(
        "--backend",
        "grpc",
        "--address",
        bench_cluster.address,
        "--dataset",
        "trace",
        "--trace",
        str(trace),
        "--max-concurrency",
        "2",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(out.read_text())["summary"]
    assert summary["completed"] == 3 and summary["total_output"] == 4 + 3 + 2


@pytest.mark.parametrize(
    "flags",
    [
        ["--dataset", "shared-prefix", "--prefix-len", "32", "--num-prefixes", "2"],
        ["--endpoint", "/v1/chat/completions", "--dataset", "trace"],
    ],
)
def test_bench_workloads(bench_cluster: HttpCluster, tmp_path: Path, flags: list[str]) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        '{"prompt": "t5 t6", "output_len": 3}\n{"messages": [{"role": "user", "content": "t7"}]}\n'
    )
    proc = _bench(
        "--base-url",
        bench_cluster.base_url,
        "--num-prompts",
        "4",
        "--random-input-len",
        "8",
        "--random-output-len",
        "3",
        "--burstiness",
        "0.5",
        "--request-rate",
        "50",
        "--trace",
        str(trace),
        *flags,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Failed requests:                         0" in proc.stdout
