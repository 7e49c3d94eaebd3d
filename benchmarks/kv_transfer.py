"""KV handoff time, gRPC chunks vs NIXL READs, between real worker processes.

Handoff time = the decode worker's import of one prefilled prompt: reserve its
blocks, move K and V of every layer, verify them (coverage, finite values) and,
for NIXL, have the owner confirm it still held them -- from "the prefill is done
and its handle is published" to "the decode worker holds verified KV". It is the
``kv_transfer_ms`` the decode worker reports on its first response.

Setup: a real Valkey, one prefill worker (``--kv-transport auto``: offers both)
and two decode workers, ``--kv-transport grpc`` and ``--kv-transport nixl``,
each its own process (``disagg prefill|decode``, ``--threads 1``). Per prompt
size, the same prompt is prefilled once per sample on the prefill worker (its
prefix cache makes repeats cheap; the handoff always moves every block) and
handed to one decode worker with ``max_tokens`` 1. Sizes and transports are
interleaved round by round (grpc, nixl, nixl, grpc, ...), after one untimed
warm-up handoff of each (the first NIXL READ to a new owner connects first).

    python benchmarks/kv_transfer.py --json benchmarks/results/kv-transfer-smollm2-cpu2.json
    python benchmarks/kv_transfer.py --model /path/to/tiny --sizes 16,64 --reps 2   # seconds

JSON keys: ``handoff_ms_<transport>_<tokens>`` (medians), ``nixl_vs_grpc_<tokens>``
(ratio of the medians), ``kv_mib_<tokens>``, the samples, and the machine's load
before and after (this machine is shared: read the ratios, not the absolutes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from disagg.v1 import common_pb2, worker_pb2, worker_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
TRANSPORTS = ("grpc", "nixl")
LAYERWISE = "nixl_layerwise"  # NIXL READs layer by layer while the prompt runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def workers(model: str, redis_url: str, logdir: Path) -> Iterator[dict[str, str]]:
    """{"prefill": addr, "grpc": addr, "nixl": addr} of three running worker processes."""
    specs = {"prefill": ("prefill", "auto"), "grpc": ("decode", "grpc"), "nixl": ("decode", "nixl")}
    procs: list[subprocess.Popen[bytes]] = []
    addrs: dict[str, str] = {}
    try:
        for name, (role, transport) in specs.items():
            port = free_port()
            argv = [sys.executable, "-m", "disagg.cli", role, "--redis-url", redis_url,
                    "--port", str(port), "--threads", "1", "--kv-transport", transport,
                    "--worker-id", f"bench-{name}"]  # fmt: skip
            if model:
                argv += ["--model", model]
            with open(logdir / f"{name}.log", "wb") as log:
                procs.append(
                    subprocess.Popen(
                        argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
            addrs[name] = f"127.0.0.1:{port}"
        for addr in addrs.values():
            wait_serving(addr, procs)
        yield addrs
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def wait_serving(addr: str, procs: list[subprocess.Popen[bytes]], timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(addr) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a worker exited during startup (see its log)")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{addr} not serving after {timeout_s}s")
            time.sleep(0.5)


def _decode(addr: str, rid: str, prompt: list[int], handle: Any, max_tokens: int) -> Any:
    """The Decode's first response; raises if the import failed (a local prefill)."""
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens)
    req = worker_pb2.DecodeRequest(
        request_id=rid, prompt_token_ids=prompt, sampling=sampling, handle=handle
    )
    with grpc.insecure_channel(addr) as ch:
        resps = list(worker_pb2_grpc.DecodeWorkerStub(ch).Decode(req, timeout=600))
    first = resps[0]
    if first.prefill_ms > 0 or first.kv_transport == "fallback":
        raise RuntimeError(f"handoff of {rid} failed (see the decode worker's log)")
    return first


def _prefill(addr: str, rid: str, prompt: list[int], max_tokens: int) -> Any:
    """One Prefill on the prefill worker; its handle."""
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens)
    req = worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=sampling)
    with grpc.insecure_channel(addr) as ch:
        return worker_pb2_grpc.PrefillWorkerStub(ch).Prefill(req, timeout=600).handle


def handoff_ms(addrs: dict[str, str], transport: str, rid: str, prompt: list[int]) -> float:
    """Prefill on the prefill worker, then one Decode (max_tokens 1) on the transport's
    decode worker; the decode worker's kv_transfer_ms. Raises if the import failed."""
    handle = _prefill(addrs["prefill"], rid, prompt, 1)
    return float(_decode(addrs[transport], rid, prompt, handle, 1).kv_transfer_ms)


def layerwise(addrs: dict[str, str], rid: str, prompt: list[int]) -> tuple[float, float]:
    """A streamed prefill (PrefillStream) taken at once by the NIXL decode worker, which
    READs each layer as it lands: (the handoff after the prefill's last layer -- its done
    to verified KV, the decode worker's kv_transfer_ms --, client ms from the call to the
    end of a Decode of 2 tokens)."""
    sampling = common_pb2.SamplingParams(max_tokens=2)
    start = time.perf_counter()
    with grpc.insecure_channel(addrs["prefill"]) as ch:
        request = worker_pb2.PrefillRequest(
            request_id=rid, prompt_token_ids=prompt, sampling=sampling
        )
        calls = worker_pb2_grpc.PrefillWorkerStub(ch).PrefillStream(
            worker_pb2.PrefillStreamRequest(prefill=request), timeout=600
        )
        handle = next(calls).prefill.handle
        with ThreadPoolExecutor(1) as pool:
            decoding = pool.submit(_decode, addrs["nixl"], rid, prompt, handle, 2)
            for _ in calls:  # the last answer: the KV is held
                pass
            first = decoding.result()
    return float(first.kv_transfer_ms), (time.perf_counter() - start) * 1000


def whole(addrs: dict[str, str], rid: str, prompt: list[int]) -> float:
    """The baseline of ``layerwise``'s end to end: Prefill, then a Decode of 2 tokens on
    the NIXL decode worker (one decode step each way); client ms."""
    start = time.perf_counter()
    _decode(addrs["nixl"], rid, prompt, _prefill(addrs["prefill"], rid, prompt, 2), 2)
    return (time.perf_counter() - start) * 1000


def model_config(model: str) -> Any:
    from transformers import AutoConfig

    from disagg.engine.model_loader import resolve_model

    return AutoConfig.from_pretrained(resolve_model(model))


def kv_mib(model: str, tokens: int) -> float:
    cfg = model_config(model)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    blocks = -(-tokens // 16)
    per_block = 2 * cfg.num_hidden_layers * 16 * cfg.num_key_value_heads * head_dim * 4  # fp32
    return blocks * per_block / 2**20


def run(model: str, sizes: list[int], reps: int, seed: int) -> dict[str, Any]:
    from disagg.metastore.embedded import start_embedded_valkey

    rng = random.Random(seed)
    vocab = model_config(model).vocab_size

    def fresh(n: int) -> list[int]:  # no prefix-cache hit: the prefill computes every token
        return [rng.randrange(3, vocab) for _ in range(n)]

    prompts = {n: fresh(n) for n in sizes}
    load_before = os.getloadavg()
    keys = [*TRANSPORTS, LAYERWISE, "e2e_nixl", f"e2e_{LAYERWISE}"]
    samples: dict[str, list[float]] = {f"{k}_{n}": [] for k in keys for n in sizes}
    valkey = start_embedded_valkey()
    try:
        with tempfile.TemporaryDirectory() as tmp, workers(model, valkey.url, Path(tmp)) as addrs:
            for n in sizes:  # warm-up: the first prefill of each prompt, the NIXL connection
                for t in TRANSPORTS:
                    handoff_ms(addrs, t, f"warm-{t}-{n}", prompts[n])
                layerwise(addrs, f"warm-lw-{n}", fresh(n))
            for r in range(reps):
                order = TRANSPORTS if r % 2 == 0 else TRANSPORTS[::-1]
                for n in sizes:
                    for t in order:
                        ms = handoff_ms(addrs, t, f"r{r}-{t}-{n}", prompts[n])
                        samples[f"{t}_{n}"].append(ms)
                        print(f"  round {r} {n:>5} tokens {t:>14}: {ms:8.1f} ms", flush=True)
                    for kind in ("whole", "layerwise") if r % 2 == 0 else ("layerwise", "whole"):
                        rid = f"r{r}-{kind}-{n}"
                        if kind == "whole":
                            ms = whole(addrs, rid, fresh(n))
                            samples[f"e2e_nixl_{n}"].append(ms)
                            print(f"  round {r} {n:>5} tokens {'nixl':>14}: {ms:8.1f} ms"
                                  " end to end", flush=True)  # fmt: skip
                            continue
                        tail, e2e = layerwise(addrs, rid, fresh(n))
                        samples[f"{LAYERWISE}_{n}"].append(tail)
                        samples[f"e2e_{LAYERWISE}_{n}"].append(e2e)
                        print(f"  round {r} {n:>5} tokens {LAYERWISE:>14}: {tail:8.1f} ms after"
                              f" the prefill, {e2e:8.1f} ms end to end", flush=True)  # fmt: skip
    finally:
        valkey.stop()
    out: dict[str, Any] = {
        "model": model or "SmolLM2-135M-Instruct",
        "sizes": sizes,
        "reps": reps,
        "cpus": os.cpu_count(),
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
        "samples_ms": samples,
    }
    for n in sizes:
        for t in (*TRANSPORTS, LAYERWISE):
            out[f"handoff_ms_{t}_{n}"] = round(statistics.median(samples[f"{t}_{n}"]), 2)
        for t in ("nixl", LAYERWISE):
            out[f"e2e_ms_{t}_{n}"] = round(statistics.median(samples[f"e2e_{t}_{n}"]), 1)
        out[f"nixl_vs_grpc_{n}"] = round(
            out[f"handoff_ms_nixl_{n}"] / out[f"handoff_ms_grpc_{n}"], 3
        )
        out[f"layerwise_vs_nixl_{n}"] = round(
            out[f"handoff_ms_{LAYERWISE}_{n}"] / out[f"handoff_ms_nixl_{n}"], 3
        )
        out[f"e2e_layerwise_vs_nixl_{n}"] = round(
            out[f"e2e_ms_{LAYERWISE}_{n}"] / out[f"e2e_ms_nixl_{n}"], 3
        )
        out[f"kv_mib_{n}"] = round(kv_mib(model, n), 1)
    return out


def table(out: dict[str, Any]) -> str:
    rows = [
        "| prompt tokens | KV MiB | grpc ms | nixl ms | nixl / grpc | nixl+layer-wise ms "
        "after the prefill | / nixl | end to end nixl ms | nixl+layer-wise ms | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lw = LAYERWISE
    for n in out["sizes"]:
        rows.append(
            f"| {n} | {out[f'kv_mib_{n}']} | {out[f'handoff_ms_grpc_{n}']} | "
            f"{out[f'handoff_ms_nixl_{n}']} | {out[f'nixl_vs_grpc_{n}']} | "
            f"{out[f'handoff_ms_{lw}_{n}']} | {out[f'layerwise_vs_nixl_{n}']} | "
            f"{out[f'e2e_ms_nixl_{n}']} | {out[f'e2e_ms_{lw}_{n}']} | "
            f"{out[f'e2e_layerwise_vs_nixl_{n}']} |"
        )
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="model dir (default: SmolLM2-135M-Instruct)")
    p.add_argument("--sizes", default="128,512,1500,4096", help="prompt tokens, comma-separated")
    p.add_argument("--reps", type=int, default=7, help="timed handoffs per size and transport")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    out = run(args.model, [int(s) for s in args.sizes.split(",")], args.reps, args.seed)
    print(table(out))
    print(f"load average before {out['loadavg_before']}, after {out['loadavg_after']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
