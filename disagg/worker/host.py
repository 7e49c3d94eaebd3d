"""What every worker process does around its servicer.

1. Load the model and start the engine; make the KV data plane (``KvPlane``:
   a NIXL agent with the whole KV pool registered, per ``kv_transport``).
2. Bind gRPC (health + reflection, NOT_SERVING), connect to Redis, start the
   heartbeat, then SERVING.
3. SERVING until SIGTERM/SIGINT; then drain: NOT_SERVING, leave the registry
   (no new work is routed here), end the decode sessions as their requests
   end, let in-flight RPCs finish within the grace period, stop the engine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from disagg.engine.api import Engine
from disagg.engine.threads import serial_here
from disagg.metastore.store import Heartbeat, MetaStore
from disagg.metrics.http import MetricsServer
from disagg.metrics.process import gc_pause_observer
from disagg.metrics.transfer import TransferMetrics
from disagg.metrics.worker import worker_registry
from disagg.runtime.cluster_auth import ENV as CLUSTER_TOKEN_ENV
from disagg.runtime.cluster_auth import require_token
from disagg.runtime.config import WorkerConfig, tls_of
from disagg.runtime.gc_pauses import GcPauses, freeze_startup
from disagg.runtime.grpc_server import create_grpc_server
from disagg.runtime.ids import default_worker_id
from disagg.runtime.telemetry import nvml_device, read_gpu_sample, read_gpu_telemetry
from disagg.runtime.tls import required_peer_uris, server_credentials
from disagg.transfer.nixl_transport import NixlAgent, NixlUnavailable
from disagg.v1 import common_pb2
from disagg.wire import layout_to_pb
from disagg.worker.calibration import PrefillCost, calibrate_prefill
from disagg.worker.prefix import PrefixPublisher

log = logging.getLogger(__name__)

_ROLES = {"prefill": common_pb2.WORKER_ROLE_PREFILL, "decode": common_pb2.WORKER_ROLE_DECODE}


class Servicer(Protocol):
    def drain(self) -> None: ...  # before the server stops: end long-lived calls when idle

    def close(self) -> None: ...


@dataclass(frozen=True)
class KvPlane:
    """The worker's KV data plane, made once at startup and handed to its servicer."""

    agent: NixlAgent | None  # None: this worker moves KV over gRPC only
    metrics: TransferMetrics  # the decode side's imports, on /metrics

    @property
    def transports(self) -> list[str]:
        return ["nixl", "grpc"] if self.agent is not None else ["grpc"]


ServicerFactory = Callable[
    [Engine, MetaStore, str, str, KvPlane],
    tuple[Servicer, Callable[[Any, grpc.aio.Server], None]],
]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def make_kv_agent(cfg: WorkerConfig, engine: Engine, worker_id: str) -> NixlAgent | None:
    """This worker's NIXL agent per cfg.kv_transport: none for grpc; for auto, none
    when NIXL cannot run here (logged); for nixl, its absence is fatal."""
    if cfg.kv_transport == "grpc":
        return None
    try:
        return NixlAgent(engine, worker_id, loopback_only=_is_loopback(cfg.host))
    except NixlUnavailable as e:
        if cfg.kv_transport == "nixl":
            raise
        log.info("kv transport grpc only: %s", e)
        return None


def make_engine(cfg: WorkerConfig) -> Engine:
    if cfg.mock:  # model-free: time per a cost model (disagg.mock)
        from disagg.engine.model_loader import served_name
        from disagg.mock.engine import mock_engine_for
        from disagg.mock.model import default_mock_dir

        # Named after the model directory the scheduler tokenizes with (by default
        # the mock one), as a real worker is: a scheduler routes only to workers
        # that serve its own model.
        return mock_engine_for(cfg.engine, served_name(cfg.engine.model or default_mock_dir()))
    from disagg.engine.engine import LLMEngine

    engine = LLMEngine(cfg.engine)
    engine.start()
    return engine


class WorkerHost:
    def __init__(self, cfg: WorkerConfig, service_name: str, factory: ServicerFactory):
        self.cfg = cfg
        self.worker_id = cfg.worker_id or default_worker_id(cfg.role)
        self._service_name = service_name
        self._factory = factory
        self._started_ms = int(time.time() * 1000)
        self._stop = asyncio.Event()
        self.engine: Engine | None = None
        self.cost = PrefillCost(0.0, 0.0)  # measured at startup, published in heartbeats
        self.servicer: Servicer | None = None
        self.address = ""
        self.metrics_port = 0  # bound /metrics port once serving (cfg.metrics_port -1: stays 0)
        self.kv = KvPlane(None, TransferMetrics())  # its NIXL agent is made at startup
        # Set by the process's entry point: the host owns its process, whose garbage
        # collector it times (on /metrics) and tunes (cfg.gc_freeze) once serving.
        self.owns_process = False
        self._gc_pauses: GcPauses | None = None

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, engine: Engine | None = None) -> None:
        cfg = self.cfg
        serial_here()  # this loop's KV chunk writes and wipes: never a second OpenMP team
        eng = engine if engine is not None else await asyncio.to_thread(make_engine, cfg)
        self.engine = eng
        self.cost = await asyncio.to_thread(self._calibrate, eng)
        agent = await asyncio.to_thread(make_kv_agent, cfg, eng, self.worker_id)
        self.kv = KvPlane(agent, TransferMetrics())
        tls = tls_of(cfg)
        server = await create_grpc_server(
            cfg.host,
            cfg.port,
            [self._service_name],
            credentials=server_credentials(tls),
            interceptors=[
                require_token(cfg.cluster_token, [self._service_name], required_peer_uris(tls))
            ],
            max_concurrent_rpcs=cfg.max_concurrent_rpcs,
        )
        if not cfg.cluster_token:
            log.warning(
                "no cluster token (%s): anyone who reaches this port can call its methods",
                CLUSTER_TOKEN_ENV,
            )
        self.address = f"{cfg.advertise_host or cfg.host}:{server.port}"
        store = MetaStore(cfg.redis_url, namespace=cfg.namespace)
        servicer, add = self._factory(eng, store, self.worker_id, self.address, self.kv)
        self.servicer = servicer
        add(servicer, server.server)
        await server.start()  # NOT_SERVING until registered
        heartbeat = Heartbeat(store, self._info, cfg.heartbeat_s, cfg.heartbeat_ttl_s)
        await heartbeat.start()
        prefix = PrefixPublisher(store, eng, self.worker_id, cfg.heartbeat_s, cfg.heartbeat_ttl_s)
        prefix.start()
        if self.owns_process and cfg.gc_freeze:
            freeze_startup()  # the model's and the libraries' objects: never scanned again
        metrics = await self._start_metrics()  # (its pause timing: from here, serving)
        await server.set_serving(True)
        log.info("%s serving worker_id=%s address=%s", cfg.role, self.worker_id, self.address)
        self._install_signals()
        try:
            await self._stop.wait()
        finally:
            log.info("%s draining worker_id=%s", cfg.role, self.worker_id)
            if self._gc_pauses is not None:
                self._gc_pauses.remove()
            await server.set_serving(False)
            await heartbeat.stop()
            await prefix.stop()
            if metrics is not None:
                await metrics.stop()
            servicer.drain()
            await server.stop(grace_s=10.0)
            servicer.close()
            if self.kv.agent is not None:
                self.kv.agent.close()
            eng.stop()
            await store.close()

    async def _start_metrics(self) -> MetricsServer | None:
        if self.cfg.metrics_port < 0:
            return None
        engine = self.engine
        registry = worker_registry(
            self.worker_id,
            lambda: engine.stats() if engine else None,
            self.cfg.role,
            lambda: read_gpu_sample(nvml_device(self.cfg.engine.device)),
        )
        self.kv.metrics.register(registry)
        observe_gc = gc_pause_observer(registry)
        if self.owns_process:
            self._gc_pauses = GcPauses(observe_gc).install()
        server = MetricsServer(
            registry,
            self.cfg.host,
            self.cfg.metrics_port,
        )
        self.metrics_port = await server.start()
        log.info("%s metrics on %s:%d/metrics", self.cfg.role, self.cfg.host, self.metrics_port)
        return server

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._stop.set)
            except (NotImplementedError, RuntimeError):  # not the main thread (in-process tests)
                pass

    def _calibrate(self, engine: Engine) -> PrefillCost:
        fixed = self.cfg.fixed_prefill_cost()
        if fixed is not None:
            log.info("prefill cost base_ms=%.2f per_token_ms=%.4f (configured)", *fixed)
            return PrefillCost(*fixed)
        try:
            cost = calibrate_prefill(engine)
        except Exception as e:  # the scheduler falls back to its prior
            log.warning("prefill calibration failed: %s", e)
            return PrefillCost(0.0, 0.0)
        log.info("prefill cost base_ms=%.2f per_token_ms=%.4f", cost.base_ms, cost.per_token_ms)
        return cost

    def _info(self) -> common_pb2.WorkerInfo:
        assert self.engine is not None
        stats, info = self.engine.stats(), self.engine.info
        return common_pb2.WorkerInfo(
            worker_id=self.worker_id,
            role=_ROLES[self.cfg.role],
            address=self.address,
            model=info.name,
            layout=layout_to_pb(info.layout),
            free_blocks=stats.free_blocks,
            total_blocks=stats.total_blocks,
            queued_prefill_tokens=stats.queued_prefill_tokens,
            running_requests=stats.running,
            waiting_requests=stats.waiting,
            max_context=info.max_context,
            started_unix_ms=self._started_ms,
            gpu=read_gpu_telemetry(nvml_device(self.cfg.engine.device)),
            pid=os.getpid(),
            prefill_base_ms=self.cost.base_ms,
            prefill_ms_per_token=self.cost.per_token_ms,
            kv_transports=self.kv.transports,
        )
