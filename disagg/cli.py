"""The `disagg` command: `up` (whole system on one host), each service alone, and a client.

disagg up [--model DIR | --mock] [--prefill N] [--decode M] [--port 50051] [--http-port 8000] [--redis-url URL] [--namespace NS]
disagg scheduler | prefill | decode  [flags]   # one service in this process
disagg generate "prompt" [--address HOST:PORT] # stream a completion to the terminal
disagg workers [--address HOST:PORT]           # the workers the scheduler sees
disagg health [--address HOST:PORT]            # exit 0 iff the service's gRPC health is SERVING
disagg verify --prompts FILE [--address ...]   # disaggregated vs collocated greedy; exit 1 on a mismatch
disagg gpu [--device cuda:N]                   # NVML telemetry as JSON; exit 1 where no GPU
disagg bench [--base-url URL] [--request-rate R] ...  # load test with goodput (disagg.bench)
disagg replay TRACE                            # re-decide a --decision-log, compare
disagg plan --profile P.json [--gpus 8 64 512]  # P:D ratio + local-prefill threshold by simulation
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence

from disagg.engine.config import EngineConfig
from disagg.runtime.config import (
    KV_TRANSPORTS,
    POLICY_FLAGS,
    SchedulerConfig,
    WorkerConfig,
    from_env,
    override,
)


def _engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument(
        "--model", help="local HF model directory (default: SmolLM2-135M-Instruct, bundled)"
    )
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device", help="cpu | cuda | cuda:N | auto")
    g.add_argument("--block-size", type=int, help="tokens per KV block")
    g.add_argument(
        "--num-blocks", type=int, help="KV blocks per worker (default: from --kv-cache-mb)"
    )
    g.add_argument("--kv-cache-mb", type=int, help="KV pool size per worker in MiB")
    g.add_argument("--max-num-seqs", type=int, help="requests in one decode batch")
    g.add_argument("--max-num-batched-tokens", type=int, help="prefill tokens per step")
    g.add_argument("--threads", type=int, help="torch threads per worker")


def _engine_cfg(args: argparse.Namespace) -> EngineConfig:
    return override(
        from_env(EngineConfig),
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        kv_cache_mb=args.kv_cache_mb,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        threads=args.threads,
    )


def _common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="bind address (default 127.0.0.1)")
    p.add_argument(
        "--redis-url",
        help="Redis/Valkey URL of the control plane (redis:// or rediss://); one with a "
        "password belongs in $DISAGG_REDIS_URL instead, out of the process list",
    )
    p.add_argument(
        "--namespace",
        help="deployment name: prefix of every Redis key, so deployments sharing a Redis "
        "never see each other (default: $DISAGG_NAMESPACE, else disagg)",
    )
    p.add_argument("--log-level", default=None, help="DEBUG | INFO | WARNING")


def _policy_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("routing and admission")
    for flag, kind, text in POLICY_FLAGS:
        g.add_argument(flag, type=kind, help=text)


def _policy_args(args: argparse.Namespace) -> dict[str, object]:
    """The routing flags given, as SchedulerConfig fields."""
    names = (f[0][2:].replace("-", "_") for f in POLICY_FLAGS)
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="disagg", description="Disaggregated LLM inference server"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser(
        "up", help="start Valkey (embedded), the scheduler and the workers on this host"
    )
    _common_flags(up)
    _engine_flags(up)
    up.add_argument("--prefill", type=int, default=1, help="prefill workers")
    _kv_transport_flag(up)
    up.add_argument("--decode", type=int, default=1, help="decode workers")
    up.add_argument(
        "--schedulers",
        type=int,
        default=1,
        help="scheduler replicas on the same gRPC and HTTP ports (SO_REUSEPORT; default 1)",
    )
    up.add_argument(
        "--max-restarts",
        type=int,
        default=5,
        help="a service that exits more often than this within 60 s stops the system "
        "(a crash loop); fewer exits are restarted with backoff",
    )
    up.add_argument("--port", type=int, default=50051, help="scheduler gRPC port")
    up.add_argument(
        "--http-port", type=int, default=8000, help="OpenAI-compatible HTTP port (-1 = off)"
    )
    up.add_argument(
        "--ready-timeout", type=float, default=600.0, help="seconds to wait for every service"
    )
    up.add_argument(
        "--cpu-affinity",
        action="append",
        metavar="ROLE=CPUS",
        help="pin every worker of a role to these CPUs (taskset list, e.g. prefill=0 decode=1)",
    )
    up.add_argument(
        "--mock",
        action="store_true",
        help="model-free mock workers (time per a cost model; DISAGG_MOCK_* tunes it)",
    )
    _policy_flags(up)
    up.add_argument(
        "--api-key", help="require 'Bearer KEY' on HTTP and gRPC (default: $DISAGG_API_KEY, none)"
    )

    sch = sub.add_parser("scheduler", help="run the scheduler")
    _common_flags(sch)
    sch.add_argument("--model", help="model directory for the tokenizer")
    sch.add_argument("--port", type=int, help="gRPC port (default 50051)")
    sch.add_argument("--http-port", type=int, help="HTTP port (default 8000, -1 = off)")
    sch.add_argument("--default-max-tokens", type=int)
    sch.add_argument("--max-inflight", type=int)
    sch.add_argument("--replica-id", help="id among replicas sharing Redis (default: generated)")
    sch.add_argument(
        "--reuse-port",
        action="store_true",
        default=None,
        help="share the gRPC and HTTP ports with other replicas on this host (SO_REUSEPORT)",
    )
    _policy_flags(sch)
    sch.add_argument(
        "--api-key", help="require 'Bearer KEY' on HTTP and gRPC (default: $DISAGG_API_KEY, none)"
    )

    for role in ("prefill", "decode"):
        w = sub.add_parser(role, help=f"run a {role} worker")
        _common_flags(w)
        _engine_flags(w)
        w.add_argument("--port", type=int, help="gRPC port (default: any free port)")
        w.add_argument(
            "--advertise-host",
            help="host other services use to reach this worker "
            "(default: --host, or this machine's hostname when --host is 0.0.0.0 / ::)",
        )
        w.add_argument(
            "--metrics-port", type=int, help="Prometheus /metrics port (-1 = off, 0 = any free)"
        )
        w.add_argument("--worker-id")
        w.add_argument("--kv-lease-s", type=float, help="prefill: free unpulled KV after this long")
        w.add_argument(
            "--prefill-cost",
            metavar="BASE_MS,PER_TOKEN_MS",
            help="publish this prefill cost instead of measuring it at startup",
        )
        _kv_transport_flag(w)
        w.add_argument("--mock", action="store_true", default=None, help="model-free mock engine")

    gen = sub.add_parser("generate", help="stream a completion from a running scheduler")
    gen.add_argument("prompt")
    gen.add_argument("--address", default="127.0.0.1:50051")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    gen.add_argument("--max-tokens", type=int)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[])
    gen.add_argument("--timeout", type=float, help="seconds for the whole call (default: none)")
    gen.add_argument("--api-key", help="Bearer key (default: $DISAGG_API_KEY)")

    wk = sub.add_parser("workers", help="list the workers a running scheduler sees")
    wk.add_argument("--address", default="127.0.0.1:50051")
    wk.add_argument("--api-key", help="Bearer key (default: $DISAGG_API_KEY)")

    hc = sub.add_parser("health", help="exit 0 iff a service's gRPC health is SERVING")
    hc.add_argument("--address", default="127.0.0.1:50051")
    hc.add_argument("--service", default="", help="service name to check ('' = the server)")
    hc.add_argument("--timeout", type=float, default=3.0, help="seconds")

    vf = sub.add_parser(
        "verify",
        help="run each prompt greedy on the disaggregated and the collocated path of the same "
        "workers; exit 1 on any difference, 2 when a comparison cannot run",
    )
    vf.add_argument("--address", default="127.0.0.1:50051")
    vf.add_argument(
        "--prompts",
        required=True,
        help="file: a prompt per line, or JSON objects (prompt | prompt_token_ids | messages)",
    )
    vf.add_argument("--max-tokens", type=int, default=32, help="tokens per run")
    vf.add_argument("--timeout", type=float, default=120.0, help="seconds per run")
    vf.add_argument("--show", type=int, default=5, help="mismatches to print in full")
    vf.add_argument("--api-key", help="Bearer key (default: $DISAGG_API_KEY)")

    gpu = sub.add_parser("gpu", help="GPU telemetry (NVML) as JSON; exit 1 where no GPU")
    gpu.add_argument("--device", default="auto", help="cuda | cuda:N (CUDA_VISIBLE_DEVICES aware)")

    rp = sub.add_parser(
        "replay", help="re-decide a decision log (--decision-log) and compare with what it says"
    )
    rp.add_argument("trace", help="JSONL decision log written by the scheduler")
    rp.add_argument("--show", type=int, default=5, help="mismatches to print")

    from disagg.bench.cli import add_arguments as bench_arguments

    bench_arguments(
        sub.add_parser("bench", help="load-test a running system; latency table and goodput")
    )
    from disagg.plan.cli import add_arguments as plan_arguments

    plan_arguments(
        sub.add_parser(
            "plan", help="P:D ratio and local-prefill threshold by simulation, from worker profiles"
        )
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from disagg.runtime.logs import setup_logging

    setup_logging(args.command, getattr(args, "log_level", None))
    handler = {
        "up": _cmd_up,
        "scheduler": _cmd_scheduler,
        "prefill": _cmd_worker,
        "decode": _cmd_worker,
        "generate": _cmd_generate,
        "workers": _cmd_workers,
        "health": _cmd_health,
        "verify": _cmd_verify,
        "gpu": _cmd_gpu,
        "bench": _cmd_bench,
        "replay": _cmd_replay,
        "plan": _cmd_plan,
    }[args.command]
    try:
        return int(handler(args) or 0)
    except BrokenPipeError:  # the reader closed stdout (`disagg workers | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second EPIPE at exit
        return 0


def _invalid(command: str, e: ValueError) -> SystemExit:
    """A bad flag or DISAGG_* value: one line on stderr, exit status 1, no traceback."""
    return SystemExit(f"disagg {command}: invalid configuration: {e}")


def _cmd_scheduler(args: argparse.Namespace) -> int:
    from services.scheduler.main import main as run

    try:
        cfg = _scheduler_config(args)
    except ValueError as e:
        raise _invalid(args.command, e) from None
    run(cfg)
    return 0


def _scheduler_config(args: argparse.Namespace) -> SchedulerConfig:
    return override(
        from_env(SchedulerConfig),
        host=args.host,
        port=args.port,
        http_port=args.http_port,
        redis_url=args.redis_url,
        namespace=args.namespace,
        model=args.model,
        default_max_tokens=args.default_max_tokens,
        max_inflight=args.max_inflight,
        api_key=args.api_key,
        replica_id=args.replica_id,
        reuse_port=args.reuse_port,
        **_policy_args(args),
    )


def _cmd_worker(args: argparse.Namespace) -> int:
    try:
        cfg = _worker_config(args)
    except ValueError as e:
        raise _invalid(args.command, e) from None
    if args.command == "prefill":
        from services.prefill.main import main as run
    else:
        from services.decode.main import main as run  # type: ignore[assignment]
    run(cfg)
    return 0


def _worker_config(args: argparse.Namespace) -> WorkerConfig:
    cfg = override(
        from_env(WorkerConfig),
        role=args.command,
        host=args.host,
        port=args.port,
        advertise_host=args.advertise_host,
        redis_url=args.redis_url,
        namespace=args.namespace,
        worker_id=args.worker_id,
        kv_lease_s=args.kv_lease_s,
        prefill_cost=args.prefill_cost,
        kv_transport=args.kv_transport,
        metrics_port=args.metrics_port,
        mock=args.mock,
    )
    return override(cfg, engine=_engine_cfg(args), advertise_host=_advertise_host(cfg))


def _advertise_host(cfg: WorkerConfig) -> str:
    """The host others dial: as configured, else this machine's hostname when bound to
    every interface (in a container, the name Docker's DNS resolves to it), else the bind host."""
    if cfg.advertise_host:
        return cfg.advertise_host
    if cfg.host in ("0.0.0.0", "::", "[::]"):
        return socket.gethostname()
    return cfg.host


def _kv_transport_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kv-transport",
        choices=KV_TRANSPORTS,
        help="KV data plane: auto (NIXL where both workers have it, else gRPC; the default) "
        "| nixl | grpc (also $DISAGG_KV_TRANSPORT)",
    )


def _cmd_up(args: argparse.Namespace) -> int:
    from disagg.launcher import Launcher

    if args.prefill < 0 or args.decode < 1 or args.schedulers < 1:
        print("disagg up: need --decode >= 1, --prefill >= 0, --schedulers >= 1", file=sys.stderr)
        return 2
    from disagg.launcher import parse_cpu_affinity

    try:
        parse_cpu_affinity(args.cpu_affinity or [])
    except ValueError as e:
        print(f"disagg up: {e}", file=sys.stderr)
        return 2
    if args.kv_transport:  # the workers read it from their environment (WorkerConfig)
        os.environ["DISAGG_KV_TRANSPORT"] = args.kv_transport
    try:
        launcher = Launcher(args, _engine_cfg(args))
    except ValueError as e:  # e.g. a malformed --namespace
        print(f"disagg up: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return launcher.run(stop)


def _cmd_generate(args: argparse.Namespace) -> int:
    from disagg.client import Client, ClientError

    chat = [{"role": "user", "content": args.prompt}] if args.chat else None
    with Client(args.address, api_key=args.api_key) as client:
        try:
            for ev in client.generate(
                None if args.chat else args.prompt,
                messages=chat,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
                stop=args.stop,
                timeout=args.timeout,
            ):
                sys.stdout.write(ev.text)
                sys.stdout.flush()
                if ev.usage is not None and ev.timings is not None:
                    u, t = ev.usage, ev.timings
                    print(
                        f"\n[{ev.finish_reason}] prompt={u.prompt_tokens} completion={u.completion_tokens} "
                        f"ttft={t.ttft_ms:.0f}ms prefill={t.prefill_ms:.0f}ms transfer={t.kv_transfer_ms:.1f}ms "
                        f"{f'({t.kv_transport}) ' if t.kv_transport else ''}decode={t.decode_ms:.0f}ms",
                        file=sys.stderr,
                    )
        except ClientError as e:
            print(f"\nerror: {e.code.name}: {e.details}", file=sys.stderr)
            return 1
    return 0


def _cmd_workers(args: argparse.Namespace) -> int:
    import json

    from google.protobuf import json_format

    from disagg.client import Client, ClientError

    with Client(args.address, api_key=args.api_key) as client:
        try:
            workers = client.list_workers()
        except ClientError as e:
            print(f"error: {e.code.name}: {e.details}", file=sys.stderr)
            return 1
    print(json.dumps({"workers": [json_format.MessageToDict(w.proto) for w in workers]}, indent=2))
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    from disagg.client import NO_RETRY, Client, ClientError

    with Client(args.address, retry=NO_RETRY) as client:
        try:
            health = client.health(args.service, timeout=args.timeout)
        except ClientError as e:
            print(f"{args.address}: {e.code.name}: {e.details}", file=sys.stderr)
            return 1
    print(f"{args.address}: {health.status}")
    return 0 if health.serving else 1


def _cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 when every prompt matches, 1 on any mismatch, 2 when a comparison cannot run."""
    from disagg.client import Client, ClientError
    from disagg.client.paths import compare, read_prompts

    try:
        prompts = read_prompts(args.prompts)
    except (OSError, ValueError) as e:
        print(f"disagg verify: {e}", file=sys.stderr)
        return 2
    bad = unchecked = 0
    with Client(args.address, api_key=args.api_key) as client:
        try:
            for c in compare(client, prompts, args.max_tokens, args.timeout):
                route = f"{c.prefill_worker} -> {c.decode_worker}"
                if c.problem:
                    unchecked += 1
                    print(f"UNCHECKED prompt {c.index} ({route}): {c.problem}")
                elif c.match:
                    print(f"match     prompt {c.index}: {len(c.collocated)} tokens ({route})")
                else:
                    bad += 1
                    print(
                        f"MISMATCH  prompt {c.index} ({route}): first difference at token "
                        f"{c.first_difference}"
                    )
                    if bad <= args.show:
                        print(f"  disaggregated {list(c.disaggregated)}")
                        print(f"  collocated    {list(c.collocated)}")
        except (ClientError, ValueError) as e:
            print(f"disagg verify: {e}", file=sys.stderr)
            return 2
    print(f"verified {len(prompts)} prompts: {bad} mismatches, {unchecked} unchecked")
    return 1 if bad else 2 if unchecked else 0


def _cmd_gpu(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from disagg.runtime.telemetry import nvml_device, read_gpu_sample

    sample = read_gpu_sample(nvml_device(args.device))
    print(json.dumps(dataclasses.asdict(sample), indent=2))
    if not sample.available:
        print(f"no GPU telemetry: {sample.reason}", file=sys.stderr)
        return 1
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from disagg.bench.cli import run

    return run(args)


def _cmd_plan(args: argparse.Namespace) -> int:
    from disagg.plan.cli import run

    return run(args)


def _cmd_replay(args: argparse.Namespace) -> int:
    """Exit 0 when every logged decision replays to the same outcome, 1 otherwise."""
    import json

    from disagg.policy.trace import replay

    with open(args.trace) as f:
        result = replay(json.loads(line) for line in f if line.strip())
    bad = result.mismatches
    print(f"replayed {result.decisions} decisions: {len(bad)} differ")
    for m in bad[: args.show]:
        print(f"  {m.rid}: logged {m.logged} replayed {m.replayed}")
    return 1 if bad else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
