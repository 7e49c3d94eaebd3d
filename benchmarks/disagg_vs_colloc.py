"""Disaggregated vs collocated on the same cores: latency, SLO attainment and goodput.

Three layouts of the same model on this machine's two cores, under the same
Poisson workload (a mix of long prompts with short outputs and short chats
with long outputs), each started with ``disagg up`` and driven by
``disagg.bench`` over gRPC:

- ``colloc``: one worker does both phases on both cores
  (``--prefill 0 --decode 1 --threads 2``);
- ``disagg``: a prefill worker pinned to core 0 and a decode worker pinned to
  core 1 (``--threads 1 --cpu-affinity prefill=0 --cpu-affinity decode=1``);
- ``cond``: ``disagg`` with prompts under ``--local-prefill-tokens`` prefilled
  on the decode worker;
- ``colloc-cN`` (one per ``--colloc-chunks N``): ``colloc`` with a prefill chunk
  of N tokens per step (``--max-num-batched-tokens N``; the engine default is
  2,048, so a ~1,500-token prompt is one step): shorter stalls, more of them.
  ``goodput_ratio`` divides by the best collocated layout.

Order of a run:

1. Worker profiles for the planner: ``benchmarks/engine.py --profile-out``
   with 1 thread on core 1 and 2 threads on both cores (``--profiles`` reuses
   two such files; with ``--quick`` or ``--no-engine-profile`` a profile is
   built from the single-request probes instead).
2. Per layout: start it, warm it up, probe single requests (one long prompt,
   one chat, alone) and sweep the rates. The collocated probes set the SLO:
   TTFT <= ``--ttft-scale`` x its long-prompt TTFT, TPOT <= ``--itl-scale`` x
   its chat TPOT. Rates are fractions (``--loads``) of the collocated
   layout's prefill capacity: 1 / (mean TTFT alone over the mix).
3. The planner's simulator replays every measured point (same lengths, same
   arrival times) from the profiles; predicted vs measured p99 TTFT and ITL.
4. Table, attainment curves (``--plot``), JSON (``--json``).

A request meets the SLO when its TTFT <= X and its TPOT (mean inter-token
latency) <= Y, as in ``disagg bench --slo``. Goodput of a layout: the highest
rate whose attainment is >= ``--target``, interpolated between the swept rates.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
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
from dataclasses import dataclass, field
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from disagg.bench import report
from disagg.bench.arrivals import gaps as poisson_gaps
from disagg.bench.backends import GrpcBackend, RequestResult
from disagg.bench.runner import run_workload
from disagg.bench.workload import BenchRequest
from disagg.plan import profile as plan_profile
from disagg.plan.sim import Cluster, percentile, simulate
from disagg.plan.workload import SimRequest

HERE = os.path.dirname(os.path.abspath(__file__))
NO_LOCAL_QUEUE_MS = "1e9"  # turns off the queue-pressure local-prefill rule: (b) stays pure


@dataclass(frozen=True)
class Mix:
    long_prompt: tuple[int, int] = (1350, 1650)
    long_output: tuple[int, int] = (8, 24)
    chat_prompt: tuple[int, int] = (32, 96)
    chat_output: tuple[int, int] = (96, 160)
    long_share: float = 0.2


QUICK_MIX = Mix((100, 140), (4, 8), (8, 16), (8, 16), 0.5)


@dataclass(frozen=True)
class Layout:
    name: str
    argv: tuple[str, ...]
    cluster: Cluster  # what the simulator models
    chunk: int = 0  # prefill tokens per step when not the engine default

    @property
    def collocated(self) -> bool:
        return self.cluster.prefill == 0


# --disagg-variants: more ``disagg`` layouts, each with one change (the KV data plane).
DISAGG_VARIANTS: dict[str, tuple[str, ...]] = {
    "grpc": ("--kv-transport", "grpc"),  # KV as protobuf chunks (``disagg`` itself: auto, NIXL)
    "lw": ("--kv-stream-tokens", "512"),  # long prompts' KV streamed layer by layer (NIXL)
}


def layouts(
    local_tokens: int, colloc_chunks: tuple[int, ...] = (), variants: tuple[str, ...] = ()
) -> list[Layout]:
    pin = ("--threads", "1", "--cpu-affinity", "prefill=0", "--cpu-affinity", "decode=1")
    no_q = ("--local-prefill-queue-ms", NO_LOCAL_QUEUE_MS)
    colloc = ("--prefill", "0", "--decode", "1", "--threads", "2")
    return [
        Layout("colloc", colloc, Cluster(0, 1)),
        *(
            Layout(f"colloc-c{n}", (*colloc, "--max-num-batched-tokens", str(n)), Cluster(0, 1), n)
            for n in colloc_chunks
        ),
        Layout("disagg", ("--prefill", "1", "--decode", "1", *pin, *no_q), Cluster(1, 1)),
        *(
            Layout(
                f"disagg-{v}",
                ("--prefill", "1", "--decode", "1", *pin, *no_q, *DISAGG_VARIANTS[v]),
                Cluster(1, 1),
            )
            for v in variants
        ),
        Layout(
            "cond",
            (
                "--prefill",
                "1",
                "--decode",
                "1",
                *pin,
                *no_q,
                "--local-prefill-tokens",
                str(local_tokens),
            ),
            Cluster(1, 1, local_tokens),
        ),
    ]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ workload


def make_requests(
    mix: Mix, n: int, vocab: int, seed: int, token_seed: int | None = None
) -> list[BenchRequest]:
    """Lengths from ``seed``; token ids from ``token_seed`` (default: ``seed``).

    Stratified: one long prompt in every ``round(1 / long_share)`` requests, at a
    random place in its block, so every prefix of the list has the mix's share
    (drawn independently, 54 requests held 15-31 % long prompts by seed).
    Points that share ``seed`` get the same lengths; a different ``token_seed``
    gives them different prompts, so one point's KV never serves the next from
    the prefix cache.
    """
    rng = random.Random(seed)
    tok = random.Random(seed if token_seed is None else token_seed)
    lo = min(1000, vocab // 4)
    every = max(1, round(1 / mix.long_share)) if mix.long_share > 0 else 0
    out = []
    slot = 0
    for i in range(n):
        if every and i % every == 0:
            slot = i + rng.randrange(every)
        long = bool(every) and i == slot
        plen = rng.randint(*(mix.long_prompt if long else mix.chat_prompt))
        olen = rng.randint(*(mix.long_output if long else mix.chat_output))
        ids = [tok.randrange(lo, vocab) for _ in range(plen)]
        out.append(BenchRequest(prompt_token_ids=ids, max_tokens=olen, prompt_len=plen))
    return out


# ------------------------------------------------------------------ cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def cluster_up(model: str, layout: Layout, timeout_s: float) -> Iterator[str]:
    """`disagg up` with this layout; yields the scheduler's gRPC address; stops it after."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "disagg.cli",
        "up",
        "--model",
        model,
        "--port",
        str(port),
        "--http-port",
        "-1",
        "--log-level",
        "WARNING",
        *layout.argv,
    ]
    logf = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=logf, start_new_session=True, text=True
    )
    try:
        deadline = time.monotonic() + timeout_s
        assert proc.stdout is not None
        for line in proc.stdout:
            if "ready" in line:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{layout.name}: not ready after {timeout_s:.0f}s")
        if proc.poll() is not None:
            logf.seek(0)
            raise RuntimeError(f"{layout.name}: disagg up exited\n{logf.read().decode()[-3000:]}")
        yield f"127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the group of the `disagg up` we started
                proc.wait()
        logf.close()


# ------------------------------------------------------------------ probes


@dataclass
class Probe:
    """One request alone: client-side TTFT and TPOT, server-side timings."""

    prompt: int
    ttft_ms: float
    tpot_ms: float
    prefill_ms: float
    transfer_ms: float


def probe(address: str, req: BenchRequest) -> Probe:
    import grpc

    from disagg.v1 import scheduler_pb2, scheduler_pb2_grpc

    msg = scheduler_pb2.GenerateRequest(
        prompt_token_ids=req.prompt_token_ids, max_tokens=req.max_tokens, ignore_eos=True
    )
    stamps: list[float] = []
    last: Any = None
    with grpc.insecure_channel(address) as ch:
        t0 = time.perf_counter()
        for resp in scheduler_pb2_grpc.SchedulerStub(ch).Generate(msg, timeout=300):
            if resp.token_ids:
                stamps += [time.perf_counter()]
            last = resp
    n = last.usage.completion_tokens if last is not None else 0
    tpot = (stamps[-1] - stamps[0]) / max(n - 1, 1) * 1e3 if len(stamps) > 1 else math.nan
    return Probe(
        req.prompt_len,
        (stamps[0] - t0) * 1e3,
        tpot,
        last.timings.prefill_ms,
        last.timings.kv_transfer_ms,
    )


def probe_all(address: str, mix: Mix, vocab: int, reps: int) -> dict[str, Any]:
    long = [make_long(mix, vocab, 900 + i) for i in range(reps)]
    chat = [make_chat(mix, vocab, 950 + i) for i in range(reps)]
    pl = [probe(address, r) for r in long]
    pc = [probe(address, r) for r in chat]

    def med(ps: list[Probe], key: str) -> float:
        return statistics.median(getattr(p, key) for p in ps)

    return {
        "long_prompt_tokens": med(pl, "prompt"),
        "long_ttft_ms": med(pl, "ttft_ms"),
        "long_prefill_ms": med(pl, "prefill_ms"),
        "long_transfer_ms": med(pl, "transfer_ms"),
        "chat_prompt_tokens": med(pc, "prompt"),
        "chat_ttft_ms": med(pc, "ttft_ms"),
        "chat_prefill_ms": med(pc, "prefill_ms"),
        "chat_tpot_ms": med(pc, "tpot_ms"),
    }


def make_long(mix: Mix, vocab: int, seed: int) -> BenchRequest:
    mid = sum(mix.long_prompt) // 2
    r = make_requests(
        Mix(long_prompt=(mid, mid), long_output=(16, 16), long_share=1.0), 1, vocab, seed
    )
    return r[0]


def make_chat(mix: Mix, vocab: int, seed: int) -> BenchRequest:
    p, o = sum(mix.chat_prompt) // 2, sum(mix.chat_output) // 2
    return make_requests(
        Mix(chat_prompt=(p, p), chat_output=(o, o), long_share=0.0), 1, vocab, seed
    )[0]


# ------------------------------------------------------------------ load points


@dataclass
class Point:
    layout: str
    rate: float
    requests: list[BenchRequest]
    gaps: list[float]
    results: list[RequestResult] = field(default_factory=list)
    duration_s: float = 0.0


async def _drive(address: str, requests: list[BenchRequest], gaps: list[float]) -> Any:
    backend = GrpcBackend(address, "", 0.0, True)
    try:
        return await run_workload(backend.send, requests, gaps, None, False)
    finally:
        await backend.close()


def run_point(
    address: str,
    layout: str,
    rate: float,
    n: int,
    mix: Mix,
    vocab: int,
    seed: int,
    token_seed: int | None = None,
) -> Point:
    reqs = make_requests(mix, n, vocab, seed, token_seed)
    gaps = poisson_gaps(n, rate, 1.0, seed)
    pt = Point(layout, rate, reqs, gaps)
    pt.results, pt.duration_s = asyncio.run(_drive(address, reqs, gaps))
    return pt


def point_row(pt: Point, slo: dict[str, float]) -> dict[str, Any]:
    s = report.summarize(pt.results, pt.duration_s, pt.rate, None, slo)
    ok = [r for r in pt.results if r.success]
    gaps = [g * 1e3 for r in ok for g in r.itl]
    return {
        "layout": pt.layout,
        "rate": pt.rate,
        "requests": len(pt.results),
        "failed": s.failed,
        "ttft_p50_ms": s.ttft_ms.median,
        "ttft_p99_ms": s.ttft_ms.p99,
        "itl_p50_ms": s.itl_ms.median,
        "itl_p99_ms": s.itl_ms.p99,
        "itl_p999_ms": percentile(gaps, 99.9),
        # Gaps longer than the TPOT SLO: a prefill stall shows in the ITL p99 only above 1 %.
        "slow_gap_share": sum(g > slo["tpot_ms"] for g in gaps) / max(len(gaps), 1),
        "tpot_p50_ms": s.tpot_ms.median,
        "attainment": s.good / max(len(pt.results), 1),
        "throughput_rps": s.request_throughput,
        "output_tok_s": s.output_throughput,
        "long_ttft_p50_ms": _median_ms([r.ttft for r in ok if r.prompt_len >= 256]),
        "chat_ttft_p50_ms": _median_ms([r.ttft for r in ok if r.prompt_len < 256]),
    }


def _median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3 if xs else math.nan


# ------------------------------------------------------------------ profiles


def engine_profile(model: str, threads: int, cpus: str, path: str, quick: bool) -> dict[str, Any]:
    argv = [
        "taskset",
        "-c",
        cpus,
        sys.executable,
        os.path.join(HERE, "engine.py"),
        "--skip-bench",
        "--profile-out",
        path,
        "--threads",
        str(threads),
        "--rounds",
        "1",
        "--model",
        model,
    ]
    argv += ["--quick"] if quick else []
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with open(path) as f:
        return dict(json.load(f))


def probe_profile(p: dict[str, Any]) -> dict[str, Any]:
    """A two-point prefill, batch-1 decode profile from single-request probes (fallback)."""
    return {
        "prefill": [
            {"tokens": p["chat_prompt_tokens"], "ms": max(p["chat_prefill_ms"], 0.1)},
            {"tokens": p["long_prompt_tokens"], "ms": max(p["long_prefill_ms"], 0.2)},
        ],
        "decode": [{"batch": 1, "context": 128, "step_ms": p["chat_tpot_ms"]}],
        "source": "single-request probes (no engine profile)",
    }


def with_transfer(prof: dict[str, Any], probes: dict[str, Any], kv_bytes: int) -> dict[str, Any]:
    """The profile plus transfer ms per MiB measured on the long-prompt probe (base 0)."""
    mb = probes["long_prompt_tokens"] * kv_bytes / 2**20
    per_mb = probes["long_transfer_ms"] / mb if mb else 0.0
    return {
        **prof,
        "kv_bytes_per_token": kv_bytes,
        "transfer": {"base_ms": 0.0, "ms_per_mb": per_mb, "blocks_decode": True},
    }


def calibrated(prof: dict[str, Any], probes: dict[str, Any]) -> dict[str, Any]:
    """The profile's shape, scaled so it reproduces this run's single-request probes.

    The engine profile is measured in a separate process at another time; on
    shared cores the served system runs slower or faster than it by a factor
    (other jobs, the scheduler and client on the same cores). One factor for
    prefill (long-prompt probe), one for decode (chat probe's TPOT).
    """
    p = plan_profile.from_json(prof)
    kp = probes["long_prefill_ms"] / p.prefill_ms(int(probes["long_prompt_tokens"]))
    kd = probes["chat_tpot_ms"] / p.decode_ms(1, probes["chat_prompt_tokens"] + 64)
    return {
        **prof,
        "prefill": [{**x, "ms": x["ms"] * kp} for x in prof["prefill"]],
        "decode": [{**x, "step_ms": x["step_ms"] * kd} for x in prof["decode"]],
        "calibration": {"prefill_scale": kp, "decode_scale": kd},
    }


def kv_bytes_per_token(model: str) -> int:
    with open(os.path.join(model, "config.json")) as f:
        c = json.load(f)
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    kv = c.get("num_key_value_heads", heads)
    return 2 * c["num_hidden_layers"] * kv * head_dim * 4  # K and V, fp32 on CPU


# ------------------------------------------------------------------ interference


class _Sink:
    def __init__(self) -> None:
        import threading

        self.times: list[float] = []
        self.done = threading.Event()

    def __call__(self, out: Any) -> None:
        self.times += [time.perf_counter()] * len(out.token_ids)
        if out.finish is not None:
            self.done.set()


def _phase_unit(eng: Any, phase: str, vocab: int, rng: random.Random) -> float:
    """ms of one unit of work: a 1,024-token prefill, or one step of a 4 x 128-token decode."""
    from disagg.engine.api import EngineRequest, SamplingParams

    n, batch, new = (1024, 1, 1) if phase == "prefill" else (128, 4, 17)
    sinks = [_Sink() for _ in range(batch)]
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    for i, sink in enumerate(sinks):
        ids = [rng.randrange(100, vocab) for _ in range(n)]
        eng.submit(EngineRequest(f"{phase}{t0}-{i}", ids, params, sink))
    for sink in sinks:
        sink.done.wait(600)
    if phase == "prefill":
        return (sinks[0].times[0] - t0) * 1e3
    start = max(sk.times[0] for sk in sinks)
    return (max(sk.times[-1] for sk in sinks) - start) / (new - 1) * 1e3


def phase_main(model: str, phase: str, seconds: float) -> None:
    """Child: one 1-thread engine doing ``phase`` units for ``seconds`` after 'go' on stdin."""
    from disagg.engine.config import EngineConfig
    from disagg.engine.engine import LLMEngine

    cfg = EngineConfig(model=model, dtype="float32", device="cpu", num_blocks=512, threads=1)
    eng = LLMEngine(cfg)
    eng.start()
    rng = random.Random(phase)
    vocab = eng.info.vocab_size
    _phase_unit(eng, phase, vocab, rng)
    print("warm", flush=True)
    sys.stdin.readline()
    samples, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        samples.append(_phase_unit(eng, phase, vocab, rng))
    eng.stop()
    print(json.dumps({"phase": phase, "median_ms": statistics.median(samples), "n": len(samples)}))


def _run_phases(model: str, phases: list[tuple[str, str]], seconds: float) -> dict[str, Any]:
    """Each (phase, cpu) in its own pinned process, measuring at the same time."""
    procs = []
    for phase, cpu in phases:
        argv = ["taskset", "-c", cpu, sys.executable, os.path.abspath(__file__), "--model",
                model, "--_phase", phase, "--_seconds", str(seconds)]  # fmt: skip
        procs.append(
            subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        )
    for pr in procs:
        assert pr.stdout is not None
        while "warm" not in pr.stdout.readline():
            pass
    for pr in procs:
        assert pr.stdin is not None
        pr.stdin.write("go\n")
        pr.stdin.flush()
    out = {}
    for pr in procs:
        text, _ = pr.communicate(timeout=seconds + 600)
        res = json.loads(text.strip().splitlines()[-1])
        out[res["phase"]] = res
    return out


def interference(model: str, seconds: float) -> dict[str, Any]:
    """Does a prefill on core 0 slow a decode on core 1 (and back)? Shared memory bandwidth."""
    alone_d = _run_phases(model, [("decode", "1")], seconds)["decode"]
    alone_p = _run_phases(model, [("prefill", "0")], seconds)["prefill"]
    both = _run_phases(model, [("decode", "1"), ("prefill", "0")], seconds)
    return {
        "decode_step_ms_alone": alone_d["median_ms"],
        "decode_step_ms_with_prefill_on_other_core": both["decode"]["median_ms"],
        "prefill_1024_ms_alone": alone_p["median_ms"],
        "prefill_1024_ms_with_decode_on_other_core": both["prefill"]["median_ms"],
        "decode_slowdown": both["decode"]["median_ms"] / alone_d["median_ms"],
        "prefill_slowdown": both["prefill"]["median_ms"] / alone_p["median_ms"],
    }


# ------------------------------------------------------------------ analysis


def goodput(rows: list[dict[str, Any]], target: float) -> tuple[float, float]:
    """(highest swept rate meeting target, that rate interpolated to the target crossing)."""
    rows = sorted(rows, key=lambda r: r["rate"])
    best, interp = 0.0, 0.0
    for i, r in enumerate(rows):
        if r["attainment"] < target:
            prev = rows[i - 1] if i else {"rate": 0.0, "attainment": 1.0}
            a0, a1 = prev["attainment"], r["attainment"]
            frac = (a0 - target) / (a0 - a1) if a0 > a1 else 0.0
            interp = prev["rate"] + frac * (r["rate"] - prev["rate"])
            return best, interp
        best = interp = r["rate"]
    return best, interp


def profile_set(t1: dict[str, Any], t2: dict[str, Any], chunk: int = 0) -> plan_profile.Profiles:
    """1-thread profile for the disaggregated roles, 2-thread one for the collocated worker."""
    one = plan_profile.from_json(t1, "1 thread")
    if chunk:
        t2 = {**t2, "max_num_batched_tokens": chunk}
    return plan_profile.Profiles(one, one, plan_profile.from_json(t2, "2 threads"))


def validate(pt: Point, profiles: plan_profile.Profiles, cluster: Cluster) -> dict[str, Any]:
    t, reqs = 0.0, []
    for req, gap in zip(pt.requests, pt.gaps, strict=True):
        t += gap
        reqs.append(SimRequest(t, req.prompt_len, req.max_tokens))
    res = simulate(profiles, cluster, reqs)
    sim = res.stats()
    ok = [r for r in pt.results if r.success]
    meas = {
        "ttft_p99_ms": percentile([r.ttft * 1e3 for r in ok], 99),
        "itl_p99_ms": percentile([g * 1e3 for r in ok for g in r.itl], 99),
    }
    out: dict[str, Any] = {"layout": pt.layout, "rate": pt.rate, "predicted_busy": res.busy}
    for k in ("ttft_p99_ms", "itl_p99_ms"):
        out[f"measured_{k}"] = meas[k]
        out[f"predicted_{k}"] = sim[k]
        out[f"error_{k[:-3]}"] = (sim[k] - meas[k]) / meas[k] if meas[k] else math.nan
    return out


def planner_validation(
    points: list[Point],
    raw: tuple[dict[str, Any], dict[str, Any]],
    cal: tuple[dict[str, Any], dict[str, Any]],
    local_tokens: int,
    colloc_chunks: tuple[int, ...] = (),
    variants: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """Every measured point replayed by the simulator, from raw and calibrated profiles."""
    by_name = {lay.name: lay for lay in layouts(local_tokens, colloc_chunks, variants)}
    out = []
    for pt in points:
        lay = by_name[pt.layout]
        v = validate(pt, profile_set(*raw, lay.chunk), lay.cluster)
        vc = validate(pt, profile_set(*cal, lay.chunk), lay.cluster)
        v["calibrated"] = {k: x for k, x in vc.items() if k.startswith(("predicted", "error"))}
        out.append(v)
    return out


def print_validation(validation: list[dict[str, Any]]) -> None:
    print(
        "simulator vs measured (p99); engine profile as measured | calibrated to this run's probes:"
    )
    for v in validation:
        c = v["calibrated"]
        print(
            f"  {v['layout']:11} {v['rate']:.2f} rps: TTFT {v['predicted_ttft_p99_ms']:.0f} vs "
            f"{v['measured_ttft_p99_ms']:.0f} ms ({100 * v['error_ttft_p99']:+.0f}%), ITL "
            f"{v['predicted_itl_p99_ms']:.1f} vs {v['measured_itl_p99_ms']:.1f} ms "
            f"({100 * v['error_itl_p99']:+.0f}%) | TTFT {c['predicted_ttft_p99_ms']:.0f} "
            f"({100 * c['error_ttft_p99']:+.0f}%), ITL {c['predicted_itl_p99_ms']:.1f} "
            f"({100 * c['error_itl_p99']:+.0f}%)"
        )
    for key in ("error_ttft_p99", "error_itl_p99"):
        raw = sum(abs(v[key]) <= 0.2 for v in validation)
        cal = sum(abs(v["calibrated"][key]) <= 0.2 for v in validation)
        print(f"  {key[6:]} within 20 %: {raw} of {len(validation)} raw, {cal} calibrated")


def revalidate(path: str, local_tokens: int, decode_context: str = "") -> int:
    """The planner's validation again, from a run's --json (its points and profiles).

    ``decode_context`` ("mean" or "max") overrides the profiles' decode cost model.
    """
    with open(path) as f:
        run = json.load(f)
    if decode_context:
        for prof in run["profiles"].values():
            prof["decode_context"] = decode_context
    points = []
    for p in run["points"]:
        reqs = [
            BenchRequest(max_tokens=m, prompt_len=n)
            for n, m in zip(p["prompt"], p["max_tokens"], strict=True)
        ]
        pt = Point(p["layout"], p["rate"], reqs, p["gaps_s"])
        pt.results = [
            RequestResult(success=ok, ttft=t, itl=itl, prompt_len=n)
            for ok, t, itl, n in zip(
                p["success"], p["ttft_s"], p["itl_s"], p["prompt"], strict=True
            )
        ]
        points.append(pt)
    pr = run["profiles"]
    raw = (pr["prefill_decode_1_thread"], pr["colloc_2_threads"])
    cal = (pr["calibrated_1_thread"], pr["calibrated_2_threads"])
    chunks = tuple(run.get("colloc_chunks", ()))
    variants = tuple(run.get("disagg_variants", ()))
    print_validation(planner_validation(points, raw, cal, local_tokens, chunks, variants))
    return 0


def table(rows: list[dict[str, Any]]) -> str:
    cols = [
        ("layout", "{:11}"),
        ("rate", "{:6.2f}"),
        ("requests", "{:5d}"),
        ("failed", "{:3d}"),
        ("ttft_p50_ms", "{:9.0f}"),
        ("ttft_p99_ms", "{:9.0f}"),
        ("itl_p50_ms", "{:8.1f}"),
        ("itl_p99_ms", "{:8.1f}"),
        ("itl_p999_ms", "{:8.1f}"),
        ("slow_gap_share", "{:6.2%}"),
        ("tpot_p50_ms", "{:8.1f}"),
        ("attainment", "{:6.2f}"),
        ("output_tok_s", "{:7.1f}"),
    ]
    heads = [
        "layout",
        "rps",
        "n",
        "err",
        "TTFT p50",
        "TTFT p99",
        "ITL p50",
        "ITL p99",
        "ITL p99.9",
        "gaps > Y",
        "TPOT p50",
        "SLO %",
        "tok/s",
    ]
    lines = [" | ".join(heads)]
    for r in rows:
        lines.append(" | ".join(f.format(r[k]) for k, f in cols))
    return "\n".join(lines)


def plot(path: str, rows: list[dict[str, Any]], target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in dict.fromkeys(r["layout"] for r in rows):
        rs = sorted((r for r in rows if r["layout"] == name), key=lambda r: r["rate"])
        x = [r["rate"] for r in rs]
        axes[0].plot(x, [100 * r["attainment"] for r in rs], marker="o", label=name)
        axes[1].plot(x, [r["ttft_p99_ms"] for r in rs], marker="o", label=name)
        axes[2].plot(x, [r["itl_p99_ms"] for r in rs], marker="o", label=name)
    axes[0].axhline(100 * target, color="grey", linestyle="--")
    for ax, title in zip(axes, ("SLO attainment %", "TTFT p99 ms", "ITL p99 ms"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("request rate (req/s)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="", help="local HF model dir; default SmolLM2-135M-Instruct")
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes, no engine profile (smoke test)"
    )
    p.add_argument(
        "--loads",
        default="0.2,0.4,0.6",
        help="rates as fractions of the collocated prefill capacity (see the module doc)",
    )
    p.add_argument("--rates", default="", help="absolute rates (req/s), overriding --loads")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per point")
    p.add_argument("--min-requests", type=int, default=6)
    p.add_argument(
        "--long-share", type=float, default=0.2, help="share of ~1,500-token prompts in the mix"
    )
    p.add_argument("--ttft-scale", type=float, default=3.0, help="X = this x TTFT(long, alone)")
    p.add_argument("--itl-scale", type=float, default=3.0, help="Y = this x TPOT(chat, alone)")
    p.add_argument(
        "--profiles",
        default="",
        help="T1.json,T2.json: engine.py --profile-out at 1 thread and 2 threads (skip profiling)",
    )
    p.add_argument("--target", type=float, default=0.9, help="attainment that counts as goodput")
    p.add_argument("--local-prefill-tokens", type=int, default=256, help="cond layout threshold")
    p.add_argument(
        "--colloc-chunks",
        default="",
        help="N,M,...: also run the collocated layout with N (M, ...) prefill tokens per step",
    )
    p.add_argument(
        "--disagg-variants",
        default="",
        help=f"V,W,...: also run disagg-V (one of {', '.join(DISAGG_VARIANTS)}): the same "
        "disaggregated layout with its KV data plane changed",
    )
    p.add_argument("--no-engine-profile", action="store_true", help="profile from probes only")
    p.add_argument("--json", dest="json_path", default="")
    p.add_argument("--plot", default="", help="attainment / p99 curves PNG")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interference-s", type=float, default=15.0, help="0 = skip that measurement")
    p.add_argument("--only-interference", action="store_true", help="measure only that, print it")
    p.add_argument(
        "--revalidate", metavar="JSON", help="replay a run's --json through the simulator only"
    )
    p.add_argument(
        "--decode-context",
        choices=("mean", "max"),
        default="",
        help="with --revalidate: cost mixed decode batches at their mean or longest context",
    )
    p.add_argument("--_phase", help=argparse.SUPPRESS)
    p.add_argument("--_seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._phase:
        phase_main(a.model, a._phase, a._seconds)
        return 0
    if a.revalidate:
        return revalidate(a.revalidate, a.local_prefill_tokens, a.decode_context)

    from disagg.engine.model_loader import resolve_model

    model = resolve_model(a.model)
    with open(os.path.join(model, "config.json")) as f:
        vocab = int(json.load(f)["vocab_size"])
    if not 0.0 < a.long_share <= 1.0:
        p.error("--long-share must be in (0, 1]")
    mix = QUICK_MIX if a.quick else Mix(long_share=a.long_share)
    chunks = tuple(int(x) for x in a.colloc_chunks.split(",") if x.strip())
    if any(n <= 0 for n in chunks):
        p.error("--colloc-chunks must be positive token counts")
    variants = tuple(v for v in a.disagg_variants.split(",") if v.strip())
    if any(v not in DISAGG_VARIANTS for v in variants):
        p.error(f"--disagg-variants: each one of {', '.join(DISAGG_VARIANTS)}")
    all_layouts = layouts(a.local_prefill_tokens, chunks, variants)
    duration = 1.0 if a.quick else a.duration
    min_n = 4 if a.quick else a.min_requests
    max_n = 6 if a.quick else 10**6
    loads = "0.3,0.9" if a.quick and not a.rates else a.loads
    t_start = time.monotonic()

    prof: dict[str, dict[str, Any]] = {}
    if a.profiles:
        for key, path in zip(("t1", "t2"), a.profiles.split(","), strict=True):
            with open(path) as f:
                prof[key] = json.load(f)
    elif not (a.quick or a.no_engine_profile):
        with tempfile.TemporaryDirectory() as d:
            log("profiling the engine: 1 thread on core 1, 2 threads on cores 0-1 ...")
            prof["t1"] = engine_profile(model, 1, "1", os.path.join(d, "t1.json"), False)
            prof["t2"] = engine_profile(model, 2, "0,1", os.path.join(d, "t2.json"), False)

    inter: dict[str, Any] = {}
    if a.only_interference or (a.interference_s > 0 and not a.quick):
        log("interference: decode on core 1 / prefill on core 0, alone and together ...")
        inter = interference(model, a.interference_s)
        log(f"   {json.dumps({k: round(v, 2) for k, v in inter.items()})}")
        if a.only_interference:
            print(json.dumps(inter, indent=2))
            return 0

    rows: list[dict[str, Any]] = []
    points: list[Point] = []
    probes: dict[str, dict[str, Any]] = {}
    slo: dict[str, float] = {}
    rates: list[float] = []
    for i, lay in enumerate(all_layouts):
        log(f"== {lay.name}: disagg up {' '.join(lay.argv)}")
        with cluster_up(model, lay, 600.0) as address:
            probe(address, make_long(mix, vocab, 2))  # warm-up
            probes[lay.name] = probe_all(address, mix, vocab, 1 if a.quick else 2)
            log(f"   alone: {json.dumps({k: round(v, 1) for k, v in probes[lay.name].items()})}")
            if i == 0:  # collocated first: it sets the SLO and the rates
                c = probes[lay.name]
                slo = {
                    "ttft_ms": a.ttft_scale * c["long_ttft_ms"],
                    "tpot_ms": a.itl_scale * c["chat_tpot_ms"],
                }
                share = mix.long_share
                cap = 1000.0 / (share * c["long_ttft_ms"] + (1 - share) * c["chat_ttft_ms"])
                rates = (
                    [float(x) for x in a.rates.split(",")]
                    if a.rates
                    else [round(f * cap, 3) for f in map(float, loads.split(","))]
                )
                log(
                    f"   SLO: TTFT <= {slo['ttft_ms']:.0f} ms, TPOT <= {slo['tpot_ms']:.1f} ms; "
                    f"rates {rates} req/s (prefill capacity {cap:.2f} req/s)"
                )
            for j, rate in enumerate(rates):
                n = min(max_n, max(min_n, round(rate * duration)))
                # Common random numbers: every rate replays the same lengths and arrival
                # gaps (time-scaled), with fresh prompt tokens (no prefix-cache hits).
                pt = run_point(address, lay.name, rate, n, mix, vocab, a.seed, 7919 * (j + 1))
                points.append(pt)
                rows.append(point_row(pt, slo))
                r = rows[-1]
                log(
                    f"   {rate:.2f} rps: TTFT p99 {r['ttft_p99_ms']:.0f} ms, ITL p99 "
                    f"{r['itl_p99_ms']:.1f} ms, SLO {100 * r['attainment']:.0f}%"
                )

    # The planner's view of the same runs.
    t1 = prof.get("t1") or probe_profile(probes["disagg"])
    t2 = prof.get("t2") or probe_profile(probes["colloc"])
    t1 = with_transfer(t1, probes["disagg"], kv_bytes_per_token(model))
    c1, c2 = calibrated(t1, probes["disagg"]), calibrated(t2, probes["colloc"])
    validation = planner_validation(
        points, (t1, t2), (c1, c2), a.local_prefill_tokens, chunks, variants
    )

    good = {}
    for name in (lay.name for lay in all_layouts):
        best, interp = goodput([r for r in rows if r["layout"] == name], a.target)
        good[name] = {"goodput_grid_rps": best, "goodput_rps": interp}
    colloc_rows = {r["rate"]: r for r in rows if r["layout"] == "colloc"}

    def ratios(layout: str, base: str = "colloc") -> dict[str, float]:
        mine = {r["rate"]: r for r in rows if r["layout"] == layout}
        theirs = {r["rate"]: r for r in rows if r["layout"] == base}
        return {
            str(rate): mine[rate]["itl_p99_ms"] / theirs[rate]["itl_p99_ms"]
            for rate in rates
            if theirs[rate]["itl_p99_ms"] > 0
        }

    ratio_by_rate, cond_ratio_by_rate = ratios("disagg"), ratios("cond")
    chunked_ratios = {
        lay.name: ratios("disagg", lay.name) for lay in all_layouts if lay.collocated and lay.chunk
    }
    passing = [x for x in rates if colloc_rows[x]["attainment"] >= a.target]
    at = max(passing) if passing else min(rates)
    best_dis = max(good["disagg"]["goodput_rps"], good["cond"]["goodput_rps"])
    best_col = max(
        (lay.name for lay in all_layouts if lay.collocated), key=lambda n: good[n]["goodput_rps"]
    )
    col = good[best_col]["goodput_rps"]
    out = {
        "model": model,
        "quick": a.quick,
        "mix": mix.__dict__,
        "slo": slo,
        "target": a.target,
        "rates": rates,
        "probes": probes,
        "rows": rows,
        "goodput": good,
        "itl_p99_ratio": ratio_by_rate.get(str(at), math.nan),
        "itl_p99_ratio_rate": at,
        "itl_p99_ratio_by_rate": ratio_by_rate,
        "itl_p99_ratio_cond_by_rate": cond_ratio_by_rate,
        "itl_p99_ratio_vs_chunked_by_rate": chunked_ratios,
        "goodput_ratio": best_dis / col if col > 0 else (math.inf if best_dis > 0 else math.nan),
        "goodput_ratio_baseline": best_col,
        "colloc_chunks": list(chunks),
        "disagg_variants": list(variants),
        "validation": validation,
        "interference": inter,
        "profiles": {
            "prefill_decode_1_thread": t1,
            "colloc_2_threads": t2,
            "calibrated_1_thread": c1,
            "calibrated_2_threads": c2,
        },
        "points": [
            {
                "layout": pt.layout,
                "rate": pt.rate,
                "prompt": [r.prompt_len for r in pt.requests],
                "max_tokens": [r.max_tokens for r in pt.requests],
                "gaps_s": pt.gaps,
                "ttft_s": [r.ttft for r in pt.results],
                "itl_s": [r.itl for r in pt.results],
                "success": [r.success for r in pt.results],
            }
            for pt in points
        ],
        "wall_s": time.monotonic() - t_start,
    }

    print(
        f"SLO: TTFT <= {slo['ttft_ms']:.0f} ms and TPOT <= {slo['tpot_ms']:.1f} ms "
        f"(from single requests on colloc: {a.ttft_scale:g} x TTFT(long) "
        f"{probes['colloc']['long_ttft_ms']:.0f} ms, {a.itl_scale:g} x TPOT(chat) "
        f"{probes['colloc']['chat_tpot_ms']:.1f} ms)"
    )
    for name, pr in probes.items():
        print(
            f"alone on {name:11}: long TTFT {pr['long_ttft_ms']:.0f} ms (prefill "
            f"{pr['long_prefill_ms']:.0f}, transfer {pr['long_transfer_ms']:.0f}), chat TTFT "
            f"{pr['chat_ttft_ms']:.0f} ms, chat TPOT {pr['chat_tpot_ms']:.1f} ms"
        )
    print(table(rows))
    for name, g in good.items():
        print(f"goodput {name:11}: {g['goodput_rps']:.2f} req/s (grid {g['goodput_grid_rps']:.2f})")
    print(
        f"itl_p99_ratio (disagg / colloc at {at:.2f} rps) = {out['itl_p99_ratio']:.2f}; "
        f"goodput_ratio (best disaggregated / {best_col}) = {out['goodput_ratio']:.2f}"
    )
    by_pair = [("disagg", "colloc", ratio_by_rate), ("cond", "colloc", cond_ratio_by_rate)]
    by_pair += [("disagg", base, by) for base, by in chunked_ratios.items()]
    for name, base, by in by_pair:
        cells = ", ".join(f"{float(r):.2f} rps {x:.2f}" for r, x in by.items())
        print(f"ITL p99 {name} / {base} by rate: {cells}")
    print_validation(validation)
    if a.json_path:
        with open(a.json_path, "w") as f:
            json.dump(out, f, indent=2, default=str)
    if a.plot:
        plot(a.plot, rows, a.target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
