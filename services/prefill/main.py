"""Entry point of a prefill worker process (`disagg prefill`)."""

from __future__ import annotations

import asyncio

from disagg.engine.api import Engine
from disagg.metastore.store import MetaStore
from disagg.runtime.config import WorkerConfig
from disagg.v1 import worker_pb2, worker_pb2_grpc
from disagg.worker.host import KvPlane, WorkerHost
from services.prefill.servicer import PrefillServicer

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["PrefillWorker"].full_name


def make_host(cfg: WorkerConfig) -> WorkerHost:
    def factory(engine: Engine, store: MetaStore, worker_id: str, address: str, kv: KvPlane):  # type: ignore[no-untyped-def]
        servicer = PrefillServicer(engine, store, cfg, worker_id, address, kv.agent)
        return servicer, worker_pb2_grpc.add_PrefillWorkerServicer_to_server

    return WorkerHost(cfg, SERVICE_NAME, factory)


def main(cfg: WorkerConfig) -> None:
    host = make_host(cfg)
    host.owns_process = True
    asyncio.run(host.run())
