"""`disagg up`: the whole system on one host, each service its own process.

1. Resolve the model once (the default is converted and cached here, so the
   workers only load safetensors).
2. Redis: --redis-url, else $DISAGG_REDIS_URL, else an embedded Valkey on a
   free loopback port. The URL reaches the services in their environment
   (DISAGG_REDIS_URL), never their argv, and the `ready` line shows it with
   its password redacted. Every key lives under --namespace (default disagg).
3. Spawn the scheduler, N prefill and M decode workers (`python -m disagg.cli ...`).
4. Ready when the scheduler's health is SERVING and it sees every worker;
   print one line with `ready` (a service that dies before that is fatal: a
   bad flag or model would only crash again).
5. Serve, supervised (disagg.runtime.supervisor): a service that dies is
   restarted with backoff while the rest keep serving; restart counts go to
   the log and to Redis (the scheduler's /metrics). Only a crash loop or the
   embedded Valkey's death stops the system, with a message saying which.
6. On SIGINT/SIGTERM: stop every process group, then Valkey.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import secrets
import sys
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from disagg.engine.config import EngineConfig
from disagg.engine.model_loader import resolve_model
from disagg.metastore.embedded import EmbeddedValkey, start_embedded_valkey
from disagg.metastore.keys import DEFAULT_NAMESPACE, check_namespace
from disagg.metastore.store import MetaStore, redacted
from disagg.mock.model import make_mock_model
from disagg.runtime.cluster_auth import ENV as CLUSTER_TOKEN_ENV
from disagg.runtime.config import POLICY_FLAGS, SchedulerConfig, from_env, tls_of
from disagg.runtime.procs import ServiceExited, ServiceGroup
from disagg.runtime.supervisor import RestartPolicy, Supervisor
from disagg.runtime.tls import sync_channel
from disagg.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

T = TypeVar("T")

REDIS_URL_ENV = "DISAGG_REDIS_URL"
NAMESPACE_ENV = "DISAGG_NAMESPACE"


def _engine_argv(e: EngineConfig, threads: int) -> list[str]:
    return [
        "--model", e.model, "--dtype", e.dtype, "--device", e.device,
        "--block-size", str(e.block_size), "--num-blocks", str(e.num_blocks),
        "--kv-cache-mb", str(e.kv_cache_mb), "--max-num-seqs", str(e.max_num_seqs),
        "--max-num-batched-tokens", str(e.max_num_batched_tokens), "--threads", str(threads),
    ]  # fmt: skip


def parse_cpu_affinity(specs: list[str]) -> dict[str, str]:
    """['prefill=0', 'decode=1,2'] -> {'prefill': '0', 'decode': '1,2'}; ValueError when malformed."""
    out: dict[str, str] = {}
    for spec in specs:
        role, sep, cpus = spec.partition("=")
        if not sep or role not in ("prefill", "decode") or not cpus:
            raise ValueError(f"bad --cpu-affinity {spec!r}: expected prefill=CPUS or decode=CPUS")
        out[role] = cpus
    return out


def _pinned(argv: list[str], cpus: str | None) -> list[str]:
    """argv run on those CPUs only (taskset execs the command: the pid stays the worker's)."""
    return argv if not cpus else ["taskset", "-c", cpus, *argv]


class Launcher:
    def __init__(self, args: argparse.Namespace, engine: EngineConfig):
        self.args = args
        self.engine = engine
        self.host = args.host or "127.0.0.1"
        self.valkey: EmbeddedValkey | None = None
        self.api_key = getattr(args, "api_key", None) or os.environ.get("DISAGG_API_KEY", "")
        self.namespace = check_namespace(
            getattr(args, "namespace", None) or os.environ.get(NAMESPACE_ENV) or DEFAULT_NAMESPACE
        )

    def _redis_url(self) -> str:
        """The control plane's URL: given (flag, then environment), or an embedded Valkey's."""
        given = getattr(self.args, "redis_url", None)
        if given and urlsplit(given).password is not None:
            print(
                f"disagg: warning: --redis-url carries a password, visible to every local user "
                f"in the process list; pass it in ${REDIS_URL_ENV} instead",
                file=sys.stderr,
                flush=True,
            )
        url = given or os.environ.get(REDIS_URL_ENV, "")
        if not url:
            self.valkey = start_embedded_valkey()
            url = self.valkey.url
        return url

    def run(self, stop: threading.Event) -> int:
        model = make_mock_model() if self.mock else resolve_model(self.engine.model)
        engine = dataclasses.replace(self.engine, model=model)
        redis_url = self._redis_url()
        ns = self.namespace
        group = ServiceGroup()
        try:
            _store_call(redis_url, ns, lambda store: store.clear_restarts())
            supervisor = Supervisor(
                group,
                RestartPolicy(max_restarts=getattr(self.args, "max_restarts", 5)),
                on_restart=lambda name, n: _store_call(
                    redis_url, ns, lambda store: store.record_restart(name, n)
                ),
            )
            self._spawn(supervisor, engine, redis_url)
            if not self._wait_ready(group, stop, redis_url):
                return 1
            print(
                f"disagg ready: grpc {self.host}:{self.args.port} http {self.host}:{self.args.http_port} "
                f"prefill={self.args.prefill} decode={self.args.decode} "
                f"schedulers={self.args.schedulers} redis={redacted(redis_url)} namespace={ns}",
                flush=True,
            )
            return self._serve(supervisor, stop)
        except ServiceExited as e:
            print(f"disagg: {e}", file=sys.stderr)
            return 1
        finally:
            group.terminate_all(timeout_s=15.0)
            if self.valkey is not None:
                self.valkey.stop()
            print("disagg stopped", file=sys.stderr, flush=True)

    def _serve(self, supervisor: Supervisor, stop: threading.Event) -> int:
        """Until a signal (0), a crash loop or Valkey's death (1)."""
        while not stop.wait(0.2):
            fatal = supervisor.poll()
            if fatal is None and self.valkey is not None and not self.valkey.running:
                fatal = "the embedded Valkey exited: the control plane is gone; stopping"
            if fatal is not None:
                print(f"disagg: {fatal}", file=sys.stderr, flush=True)
                return 1
        return 0

    def _spawn(self, supervisor: Supervisor, engine: EngineConfig, redis_url: str) -> None:
        py = [sys.executable, "-m", "disagg.cli"]
        common = ["--host", self.host, "--namespace", self.namespace]
        n = self.args.prefill + self.args.decode
        threads = engine.threads or max(1, (os.cpu_count() or 1) // n)
        # Secrets travel in the environment, not argv, so `ps` does not show them. The
        # cluster token closes the worker methods to everything but this system's own
        # processes: a fresh one per run unless the operator set one.
        token = os.environ.get(CLUSTER_TOKEN_ENV) or secrets.token_urlsafe(32)
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            CLUSTER_TOKEN_ENV: token,
            REDIS_URL_ENV: redis_url,  # it may hold a password: not in argv
        }
        sched_env = {**env, "DISAGG_API_KEY": self.api_key} if self.api_key else env
        replicas = self.args.schedulers
        for i in range(replicas):
            name = "scheduler" if replicas == 1 else f"scheduler-{i}"
            argv = [
                *py,
                "scheduler",
                *common,
                "--model",
                engine.model,
                "--port",
                str(self.args.port),
            ]
            argv += ["--http-port", str(self.args.http_port), *self._policy_argv()]
            argv += ["--reuse-port", "--replica-id", name] if replicas > 1 else []
            supervisor.add(name, argv, env=sched_env)
        for role, count in (("prefill", self.args.prefill), ("decode", self.args.decode)):
            for i in range(count):
                argv = [*py, role, *common, "--port", "0", *_engine_argv(engine, threads)]
                argv += ["--mock"] if self.mock else []
                argv = _pinned(argv, self.cpu_affinity.get(role))
                supervisor.add(f"{role}-{i}", argv, env=env)  # each its own free port

    @property
    def cpu_affinity(self) -> dict[str, str]:
        """role -> CPU list, from `--cpu-affinity ROLE=CPUS` (repeatable)."""
        return parse_cpu_affinity(getattr(self.args, "cpu_affinity", None) or [])

    @property
    def mock(self) -> bool:
        return bool(getattr(self.args, "mock", False))

    def _policy_argv(self) -> list[str]:
        out: list[str] = []
        for flag, _, _ in POLICY_FLAGS:
            value = getattr(self.args, flag[2:].replace("-", "_"), None)
            out += [] if value is None else [flag, str(value)]
        return out

    def _replicas_up(self, redis_url: str) -> bool:
        """Every scheduler replica has joined (its loads record is in Redis)."""
        if self.args.schedulers == 1:
            return True
        records = _store_call(redis_url, self.namespace, lambda store: store.list_scheduler_loads())
        return records is not None and len(records) >= self.args.schedulers

    def _wait_ready(self, group: ServiceGroup, stop: threading.Event, redis_url: str) -> bool:
        address = f"{self.host}:{self.args.port}"
        with sync_channel(address, tls_of(from_env(SchedulerConfig))) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            sched = scheduler_pb2_grpc.SchedulerStub(channel)

            def ready() -> bool:
                if stop.is_set():
                    return True
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    if status != health_pb2.HealthCheckResponse.SERVING:
                        return False
                    auth = (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()
                    workers = sched.ListWorkers(
                        scheduler_pb2.ListWorkersRequest(), timeout=2, metadata=auth
                    ).workers
                except grpc.RpcError:
                    return False
                roles = [w.role for w in workers]
                return (
                    roles.count(common_pb2.WORKER_ROLE_PREFILL) >= self.args.prefill
                    and roles.count(common_pb2.WORKER_ROLE_DECODE) >= self.args.decode
                    and self._replicas_up(redis_url)
                )

            ok = group.wait_until(ready, timeout_s=self.args.ready_timeout, poll_s=0.2)
        if not ok:
            print(f"disagg: not ready after {self.args.ready_timeout:g}s", file=sys.stderr)
        return ok and not stop.is_set()


def _store_call(
    redis_url: str, namespace: str, call: Callable[[MetaStore], Awaitable[T]]
) -> T | None:
    """One control-plane call from the launcher's (synchronous) thread; None when it failed
    (logged)."""

    async def run() -> T:
        store = MetaStore(redis_url, namespace=namespace, timeout_s=1.0, retries=1)
        try:
            return await call(store)
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except Exception as e:
        print(f"disagg: control-plane call failed: {e}", file=sys.stderr, flush=True)
        return None
