"""The scheduler at scale: decision latency, admitted requests/s, streamed tokens/s.

Setup, per worker count (16 and 256 by default), all real: an embedded Valkey;
one process holding every mock worker (each its own ``WorkerHost``: gRPC server
on its own port, Redis heartbeat, ``MockEngine`` thread -- the real prefill and
decode servicers); the scheduler (``SchedulerApp``, default length-aware policy)
in its own process pinned to core 0; the load client in this process.
The workers and the client share core 1, so on this 2-core machine the client is
what limits ``admitted_rps`` and ``streamed_tok_s`` (see the printed
``client_cpu_s`` against the wall time).

Replicas (``--schedulers 1,2``): for each count, that many scheduler processes
share one port (SO_REUSEPORT, as ``disagg up --schedulers N``), each pinned to
core 0; the client spreads its streams over several connections so the kernel
spreads them over the replicas. On 2 cores the replicas share core 0 and the
client + workers share core 1: the figures are per core, not a scale-out curve.
CPU per request and per token: the scheduler processes' CPU time (utime + stime
from /proc) over the run, divided by the requests and by the tokens relayed.

Phases:
- ``admit``: short prompts, ``max_tokens=1``, ``--concurrency`` streams
  until ``--admit-requests`` are done: admitted_rps = requests / wall.
- ``stream``: ``--stream-requests`` requests of ``--stream-tokens`` tokens; the
  mock emits ``--tokens-per-step`` tokens per message (multi-token steps, a
  time-compressed stream): streamed_tok_s = tokens the client received / wall.
- decision latency: the scheduler times every ``Orchestrator.route`` call
  (prefix hashing + snapshot + policy + decision log line) over both phases.

    python benchmarks/scheduler.py --json /tmp/sched.json [--workers 16 256] [--schedulers 1,2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _pin(core: int) -> None:
    if hasattr(os, "sched_setaffinity") and core < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {core})


# --- mock workers: many in one process ----------------------------------------------------


def workers_main(
    redis_url: str,
    n_prefill: int,
    n_decode: int,
    env: dict[str, str],
    ready: Any,
    stop: Any,
    core: int,
) -> None:
    _pin(core)
    os.environ.update(env)
    import logging

    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_run_workers(redis_url, n_prefill, n_decode, ready, stop))


async def _run_workers(
    redis_url: str, n_prefill: int, n_decode: int, ready: Any, stop: Any
) -> None:
    import dataclasses

    from disagg.engine.config import EngineConfig
    from disagg.runtime.config import WorkerConfig
    from services.decode.main import make_host as make_decode
    from services.prefill.main import make_host as make_prefill

    base = WorkerConfig(
        redis_url=redis_url, mock=True, heartbeat_s=1.0, heartbeat_ttl_s=10.0,
        engine=EngineConfig(num_blocks=8192, max_num_seqs=256, max_num_batched_tokens=8192),
    )  # fmt: skip
    hosts = [
        make_prefill(dataclasses.replace(base, role="prefill", worker_id=f"prefill-{i:03d}"))
        for i in range(n_prefill)
    ] + [
        make_decode(dataclasses.replace(base, role="decode", worker_id=f"decode-{i:03d}"))
        for i in range(n_decode)
    ]
    tasks = [asyncio.create_task(h.run()) for h in hosts]
    while not all(h.address for h in hosts):
        await asyncio.sleep(0.05)
    ready.set()
    await asyncio.to_thread(stop.wait)
    for h in hosts:
        h.request_stop()
    await asyncio.gather(*tasks, return_exceptions=True)


# --- the scheduler, timing its decisions --------------------------------------------------


def scheduler_main(
    cfg_kwargs: dict[str, Any],
    port_q: Any,
    stop: Any,
    out_q: Any,
    core: int,
    profile: str = "",
    gc_freeze: bool = True,
) -> None:
    """gc_freeze: the process's garbage collector as `disagg scheduler` sets it up
    (startup frozen, disagg.runtime.gc_pauses); False: Python's defaults."""
    _pin(core)
    if profile:  # the whole process under cProfile; its top entries go to a text file
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        try:
            _scheduler(cfg_kwargs, port_q, stop, out_q, gc_freeze)
        finally:
            prof.disable()
            with open(profile, "w") as f:
                pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(40)
                pstats.Stats(prof, stream=f).sort_stats("cumulative").print_stats(80)
        return
    _scheduler(cfg_kwargs, port_q, stop, out_q, gc_freeze)


def _scheduler(
    cfg_kwargs: dict[str, Any], port_q: Any, stop: Any, out_q: Any, gc_freeze: bool
) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    from disagg.runtime.config import SchedulerConfig
    from services.scheduler import orchestrator
    from services.scheduler.main import SHUTDOWN_DEADLINE_S, SchedulerApp

    times: list[tuple[float, float]] = []  # (monotonic end, seconds)
    route = orchestrator.Orchestrator.route

    def timed(self: Any, req: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return route(self, req)
        finally:
            times.append((time.monotonic(), time.perf_counter() - t0))

    orchestrator.Orchestrator.route = timed  # type: ignore[method-assign]
    app = SchedulerApp(SchedulerConfig(**{**cfg_kwargs, "gc_freeze": gc_freeze}))
    app.exit_deadline_s = SHUTDOWN_DEADLINE_S  # as `disagg scheduler`: a hung stop says where
    app.owns_process = True  # ... and its garbage collector timed and tuned as there

    async def main() -> None:
        ready = asyncio.Event()
        task = asyncio.create_task(app.run(ready))
        await ready.wait()
        port_q.put(app.port)
        await asyncio.to_thread(stop.wait)
        app.request_stop()
        await task

    asyncio.run(main())
    out_q.put(times)


# --- the client -----------------------------------------------------------------------------


async def _one(stub: Any, pb: Any, prompt: list[int], max_tokens: int) -> int:
    n = 0
    async for resp in stub.Generate(
        pb.GenerateRequest(prompt_token_ids=prompt, max_tokens=max_tokens, ignore_eos=True)
    ):
        n += len(resp.token_ids)
    return n


async def load(
    address: str, total: int, concurrency: int, prompt_len: int, max_tokens: int
) -> tuple[float, int, int]:
    """(wall seconds, tokens received, failures) for ``total`` requests at ``concurrency``."""
    import grpc

    from disagg.v1 import scheduler_pb2, scheduler_pb2_grpc

    # One connection per CONNECTIONS workers, each its own (local subchannel pool):
    # channels to one target would otherwise share a single connection, and so a
    # single replica behind SO_REUSEPORT.
    channels = [
        grpc.aio.insecure_channel(address, [("grpc.use_local_subchannel_pool", 1)])
        for _ in range(max(1, min(concurrency, CONNECTIONS)))
    ]
    try:
        stubs = [scheduler_pb2_grpc.SchedulerStub(ch) for ch in channels]
        todo = iter(range(total))
        tokens, failures = 0, 0

        async def worker(stub: Any) -> None:
            nonlocal tokens, failures
            for i in todo:
                prompt = [3 + (i * 7 + j) % 4000 for j in range(prompt_len)]  # no prefix sharing
                try:
                    n = await _one(stub, scheduler_pb2, prompt, max_tokens)
                    tokens += n  # after the await: += await would race
                except grpc.aio.AioRpcError:
                    failures += 1

        for stub in stubs:
            await _one(stub, scheduler_pb2, [3, 4, 5], 2)  # warm the connections
        t0 = time.monotonic()
        await asyncio.gather(*(worker(stubs[k % len(stubs)]) for k in range(concurrency)))
        return time.monotonic() - t0, tokens, failures
    finally:
        for ch in channels:
            await ch.close()


CONNECTIONS = 8  # client connections: enough for the kernel to use every replica


def _cpu_s(pids: list[int]) -> float:
    """utime + stime of these processes so far, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / tick


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_one(
    n_workers: int,
    replicas: int,
    args: argparse.Namespace,
    redis_url: str,
    model: str,
    decode: str = "session",
    gc: str = "freeze",
    prefill: str = "session",
) -> dict[str, Any]:
    import redis

    with redis.Redis.from_url(redis_url) as r:
        r.flushall()
    ctx = mp.get_context("spawn")
    stop_w, stop_s, ready = ctx.Event(), ctx.Event(), ctx.Event()
    env = {
        "DISAGG_MOCK_TOKENS_PER_STEP": str(args.tokens_per_step),
        "DISAGG_MOCK_STEP_BASE_MS": "5",
    }
    wp = ctx.Process(
        target=workers_main,
        args=(redis_url, n_workers // 2, n_workers - n_workers // 2, env, ready, stop_w, 1),
    )
    wp.start()
    if not ready.wait(300):
        raise RuntimeError("workers not ready")
    port_q, out_q = ctx.Queue(), ctx.Queue()
    cfg = {"redis_url": redis_url, "model": model, "port": _free_port(), "http_port": -1,
           "max_inflight": 4096, "local_prefill_tokens": 16, "reuse_port": replicas > 1,
           "decode_sessions": decode == "session",
           "prefill_sessions": prefill == "session"}  # fmt: skip
    sps = [
        ctx.Process(
            target=scheduler_main,
            args=(
                {**cfg, "replica_id": f"scheduler-{i}"},
                port_q,
                stop_s,
                out_q,
                0,
                f"{args.profile}.{n_workers}w.{replicas}x.{i}" if args.profile else "",
                gc == "freeze",
            ),
        )
        for i in range(replicas)
    ]
    for sp in sps:
        sp.start()
    ports = {port_q.get(timeout=120) for _ in sps}
    address = f"127.0.0.1:{ports.pop()}"
    _pin(1)
    time.sleep(1.5)  # the registry sees every worker
    pids = [sp.pid for sp in sps if sp.pid is not None]
    s0 = _cpu_s(pids)
    c0 = resource.getrusage(resource.RUSAGE_SELF)
    admit_wall, _, admit_fail = asyncio.run(
        load(address, args.admit_requests, args.concurrency, args.prompt_len, 1)
    )
    s_mid = _cpu_s(pids)
    stream_wall, toks, stream_fail = asyncio.run(
        load(
            address,
            args.stream_requests,
            args.stream_concurrency,
            args.prompt_len,
            args.stream_tokens,
        )
    )
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    s1 = _cpu_s(pids)
    sched_cpu = s1 - s0
    # A request's own cost from the admit phase (one token each); what the stream
    # phase costs beyond its requests' own cost, per relayed token.
    per_request_s = (s_mid - s0) / args.admit_requests
    per_token_s = max(0.0, (s1 - s_mid) - per_request_s * args.stream_requests) / max(1, toks)
    stop_s.set()
    times = [t for _ in sps for t in out_q.get(timeout=60)]
    for sp in sps:
        sp.join(30)
    stop_w.set()
    wp.join(60)
    durations = [d * 1000 for _, d in times]
    requests = args.admit_requests + args.stream_requests
    return {
        "workers": n_workers,
        "schedulers": replicas,
        "decode": decode,
        "prefill": prefill,
        "gc": gc,
        "scheduler_cpu_s": round(sched_cpu, 2),
        "scheduler_cpu_ms_per_request": round(1000 * sched_cpu / requests, 3),
        "scheduler_cpu_us_per_token": round(
            1e6 * sched_cpu / max(1, toks + args.admit_requests), 2
        ),
        "request_cpu_ms": round(1000 * per_request_s, 3),  # a 1-token request, all in
        "token_cpu_us": round(1e6 * per_token_s, 2),  # each further relayed token
        "decisions": len(durations),
        "decision_p50_ms": round(_pct(durations, 50), 4),
        "decision_p99_ms": round(_pct(durations, 99), 4),
        "decision_mean_ms": round(statistics.fmean(durations), 4) if durations else None,
        "admitted_rps": round(args.admit_requests / admit_wall, 1),
        "streamed_tok_s": round(toks / stream_wall, 1),
        "failures": admit_fail + stream_fail,
        "client_cpu_s": round((c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime), 2),
        "wall_s": round(admit_wall + stream_wall, 2),
    }


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workers", type=int, nargs="+", default=[16, 256])
    p.add_argument(
        "--schedulers", default="1", help="replica counts to run, comma-separated (e.g. 1,2)"
    )
    p.add_argument("--admit-requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--stream-requests", type=int, default=128)
    p.add_argument("--stream-concurrency", type=int, default=64)
    p.add_argument("--stream-tokens", type=int, default=1024)
    p.add_argument("--tokens-per-step", type=int, default=16)
    p.add_argument(
        "--decode",
        nargs="+",
        choices=["session", "call"],
        default=["session"],
        help="how the scheduler reaches decode workers: one DecodeSession per worker (the "
        "default) and/or a Decode call per request (decode_sessions off); both: one run each",
    )
    p.add_argument(
        "--prefill",
        nargs="+",
        choices=["session", "call"],
        default=["session"],
        help="how the scheduler reaches prefill workers: one PrefillSession per worker (the "
        "default) and/or a Prefill call per request (prefill_sessions off); both: one run each",
    )
    p.add_argument(
        "--gc",
        nargs="+",
        choices=["freeze", "default"],
        default=["freeze"],
        help="the scheduler's garbage collector: startup frozen, as `disagg scheduler` (the "
        "default), and/or Python's defaults; both: one run each",
    )
    p.add_argument("--json", default="")
    p.add_argument(
        "--profile", default="", help="write each scheduler's cProfile top entries to PATH.*"
    )
    args = p.parse_args()

    from disagg.metastore.embedded import start_embedded_valkey
    from disagg.mock.model import make_mock_model

    model = make_mock_model()
    valkey = start_embedded_valkey()
    try:
        counts = [int(x) for x in args.schedulers.split(",") if x.strip()]
        rows = [
            run_one(n, k, args, valkey.url, model, mode, gc, prefill)
            for n in args.workers
            for k in counts
            for mode in args.decode
            for gc in args.gc
            for prefill in args.prefill
        ]
    finally:
        valkey.stop()
    cols = [
        "workers",
        "schedulers",
        "decode",
        "prefill",
        "gc",
        "decision_p50_ms",
        "decision_p99_ms",
        "admitted_rps",
        "streamed_tok_s",
        "failures",
        "scheduler_cpu_ms_per_request",
        "scheduler_cpu_us_per_token",
        "request_cpu_ms",
        "token_cpu_us",
        "client_cpu_s",
        "wall_s",
    ]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    out: dict[str, Any] = {"runs": rows, "tokens_per_step": args.tokens_per_step}
    for r in rows:
        suffix = f"{r['workers']}" + (f"_x{r['schedulers']}" if r["schedulers"] > 1 else "")
        suffix += "_calls" if r["decode"] == "call" else ""
        suffix += "_prefillcalls" if r["prefill"] == "call" else ""
        suffix += "_gcdefault" if r["gc"] == "default" else ""
        for k in (
            "decision_p50_ms",
            "decision_p99_ms",
            "admitted_rps",
            "streamed_tok_s",
            "scheduler_cpu_ms_per_request",
            "scheduler_cpu_us_per_token",
            "request_cpu_ms",
            "token_cpu_us",
        ):
            out[f"{k}_{suffix}"] = r[k]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
