"""Entry point of the scheduler process (`disagg scheduler`).

Startup: tokenizer (no weights) -> Redis -> worker registry -> gRPC with
health + reflection -> SERVING. SIGTERM/SIGINT: NOT_SERVING, in-flight
streams finish within the grace period, then exit.
Both front ends apply the client limits (services.scheduler.limits) and share
one table of per-client slots: a client is one client over HTTP and gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from disagg.engine.model_loader import default_cache_dir, resolve_model, served_name
from disagg.metastore.store import MetaStore
from disagg.metrics.scheduler import SchedulerMetrics
from disagg.runtime.channels import ChannelCache
from disagg.runtime.cluster_auth import send_token
from disagg.runtime.config import SchedulerConfig, tls_of
from disagg.runtime.gc_pauses import GcPauses, freeze_startup
from disagg.runtime.grpc_server import GrpcServer, create_grpc_server
from disagg.runtime.ids import default_worker_id
from disagg.runtime.shutdown import ShutdownDeadline
from disagg.runtime.tls import channel_credentials, server_credentials
from disagg.tokenization.loader import TokenizerInfo, load_tokenizer
from disagg.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.scheduler.grpc_limits import ClientLimits
from services.scheduler.http_api import HttpApi, make_http_api
from services.scheduler.limits import ClientSlots
from services.scheduler.orchestrator import Orchestrator, admission_of, slo_of
from services.scheduler.registry import WorkerRegistry
from services.scheduler.requests import RequestFactory
from services.scheduler.servicer import SchedulerServicer
from services.scheduler.workers import WorkerClient

log = logging.getLogger(__name__)

# The shutdown's bound in a scheduler process: HTTP's 5 s and gRPC's 10 s of grace, the
# Redis goodbye, then teardown; under Kubernetes' 30 s terminationGracePeriodSeconds.
SHUTDOWN_DEADLINE_S = 25.0
SERVICE_NAME = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name


class SchedulerApp:
    def __init__(self, cfg: SchedulerConfig):
        self.cfg = cfg
        self.port = 0
        self.http_port = 0  # the bound HTTP port once serving (cfg.http_port -1: stays 0)
        self._stop = asyncio.Event()
        # Set by the process's entry point (``main``): the shutdown then ends the process
        # within this many seconds, whatever hangs (disagg.runtime.shutdown). None in-process.
        self.exit_deadline_s: float | None = None
        # Set by the process's entry point too: the app owns its process, whose garbage
        # collector it times (and tunes, cfg.gc_freeze) once serving. False in-process.
        self.owns_process = False
        self._server: GrpcServer | None = None
        self.slots = ClientSlots(cfg.max_inflight_per_client)  # both front ends' clients

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self, ready: asyncio.Event | None = None) -> None:
        cfg = self.cfg
        tok = await asyncio.to_thread(
            load_tokenizer, await asyncio.to_thread(resolve_model, cfg.model)
        )
        store = MetaStore(cfg.redis_url, namespace=cfg.namespace)
        registry = await self._start_core(tok, store)
        requests = RequestFactory(
            tok.tokenizer, tok.vocab_size, tok.max_context, cfg.default_max_tokens
        )
        server, http = await self._start_fronts(registry, requests)
        log.info(
            "scheduler serving grpc=%s:%d http=%s replica=%s",
            cfg.host,
            server.port,
            self.http_port or "off",
            registry.replica_id,
        )
        self._install_signals()
        pauses = None
        if self.owns_process:
            if cfg.gc_freeze:
                freeze_startup()
            pauses = GcPauses(self.metrics.gc_paused).install()
        if ready is not None:
            ready.set()
        try:
            await self._stop.wait()
        finally:
            if pauses is not None:
                pauses.remove()
            log.info("scheduler draining replica=%s", registry.replica_id)
            deadline = None
            if self.exit_deadline_s is not None:
                deadline = ShutdownDeadline(
                    "scheduler", self.exit_deadline_s, asyncio.get_running_loop()
                ).start()
            await self._shutdown(server, http, registry, store)
            if deadline is not None:
                deadline.drained()
            log.info("scheduler stopped replica=%s", registry.replica_id)

    async def _start_core(self, tok: TokenizerInfo, store: MetaStore) -> WorkerRegistry:
        """The registry (started), the metrics and the orchestrator."""
        cfg = self.cfg
        admission = admission_of(cfg)
        registry = WorkerRegistry(
            store,
            cfg.registry_refresh_s,
            admission.policy.prefill_prior,
            replica_id=cfg.replica_id or default_worker_id("scheduler"),
            model=served_name(cfg.model or default_cache_dir()),
        )
        await registry.start()
        self.metrics = SchedulerMetrics(slo_of(cfg))
        self.slots.on_refuse = self.metrics.rejected.labels("client_limit").inc
        channels = ChannelCache(
            credentials=channel_credentials(tls_of(cfg)),
            interceptors=send_token(cfg.cluster_token),
        )
        self._workers = WorkerClient(
            channels.get_channel,
            cfg.worker_timeout_s,
            sessions=cfg.decode_sessions,
            prefill_sessions=cfg.prefill_sessions,
        )
        self.orchestrator = Orchestrator(
            registry,
            tok.tokenizer,
            tok.eos_token_ids,
            self._workers,
            cfg.max_inflight,
            self.metrics,
            admission,
        )
        self.metrics.bind(
            lambda: self.orchestrator.inflight,
            registry.infos,
            lambda: registry.restarts,
            lambda: registry.bad_records,
        )
        return registry

    async def _start_fronts(
        self, registry: WorkerRegistry, requests: RequestFactory
    ) -> tuple[GrpcServer, HttpApi | None]:
        """gRPC (and HTTP unless off), serving."""
        cfg = self.cfg
        servicer = SchedulerServicer(self.orchestrator, registry, requests, cfg.api_key)
        server = await create_grpc_server(
            cfg.host,
            cfg.port,
            [SERVICE_NAME],
            max_message_bytes=cfg.max_body_bytes,  # larger: RESOURCE_EXHAUSTED from grpc itself
            credentials=server_credentials(tls_of(cfg)),
            reuse_port=cfg.reuse_port,
            max_concurrent_rpcs=cfg.rpc_limit,
            interceptors=[
                ClientLimits(self.slots, cfg.api_key, cfg.client_timeout_s, SERVICE_NAME)
            ],
        )
        scheduler_pb2_grpc.add_SchedulerServicer_to_server(servicer, server.server)
        await server.start()
        http: HttpApi | None = None
        if cfg.http_port >= 0:  # before self.port: a set port means both front ends are up
            http = make_http_api(
                self.orchestrator, registry, requests, cfg, self.metrics.registry, self.slots
            )
            self.http_port = await http.start(cfg.host, cfg.http_port, cfg.reuse_port)
        self.port = server.port
        await server.set_serving(True)
        return server, http

    async def _shutdown(
        self,
        server: GrpcServer,
        http: HttpApi | None,
        registry: WorkerRegistry,
        store: MetaStore,
    ) -> None:
        """NOT_SERVING, fronts closed (streams get the grace period), then the rest."""
        await server.set_serving(False)
        if http is not None:
            await http.stop()
        await server.stop(grace_s=10.0)
        await self._workers.close()
        await self.orchestrator.verifier.close()
        await registry.stop()
        await registry.leave()
        self.orchestrator.decisions.close()
        await store.close()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._stop.set)
            except (NotImplementedError, RuntimeError):
                pass


def main(cfg: SchedulerConfig) -> None:
    app = SchedulerApp(cfg)
    app.exit_deadline_s = SHUTDOWN_DEADLINE_S
    app.owns_process = True
    asyncio.run(app.run())
