"""Entry point of a decode worker process (`disagg decode`)."""

from __future__ import annotations

import asyncio

from disagg.engine.api import Engine
from disagg.metastore.store import MetaStore
from disagg.runtime.channels import ChannelCache
from disagg.runtime.cluster_auth import send_token
from disagg.runtime.config import WorkerConfig, tls_of
from disagg.runtime.tls import channel_credentials
from disagg.v1 import worker_pb2, worker_pb2_grpc
from disagg.worker.host import KvPlane, WorkerHost
from services.decode.servicer import DecodeServicer

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["DecodeWorker"].full_name


def make_host(cfg: WorkerConfig) -> WorkerHost:
    def factory(engine: Engine, store: MetaStore, worker_id: str, address: str, kv: KvPlane):  # type: ignore[no-untyped-def]
        channels = ChannelCache(
            credentials=channel_credentials(tls_of(cfg)),
            interceptors=send_token(cfg.cluster_token),
        )
        servicer = DecodeServicer(engine, cfg, channels.get_channel, store, kv)
        return servicer, worker_pb2_grpc.add_DecodeWorkerServicer_to_server

    return WorkerHost(cfg, SERVICE_NAME, factory)


def main(cfg: WorkerConfig) -> None:
    host = make_host(cfg)
    host.owns_process = True
    asyncio.run(host.run())
