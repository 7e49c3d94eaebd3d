"""The cluster token over real gRPC: worker methods refuse callers without it.

1. A real grpc.aio server on 127.0.0.1 with the worker interceptor and a
PrefillWorker servicer that counts what reaches it: unauthenticated and
wrong-token calls of a unary and a streaming method end UNAUTHENTICATED and
never run the method; the right token (sent by the channel interceptor the
scheduler and decode workers use) passes; health stays open for probes.
2. Through `disagg up`: a fresh token per run, in the services' environment only
   (not argv, not the logs, not the `ready` line); direct calls of every worker
   method from outside end UNAUTHENTICATED while the system serves.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from disagg.runtime.channels import ChannelCache
from disagg.runtime.cluster_auth import TOKEN_METADATA, require_token, send_token
from disagg.runtime.grpc_server import create_grpc_server
from disagg.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.e2e.test_up import READY_TIMEOUT_S, UpProcess, _generate, system_procs

SERVICE = "disagg.v1.PrefillWorker"
TOKEN = "s3cret-cluster-token"


class Counting(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self) -> None:
        self.calls = 0

    async def ReleaseKv(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        return worker_pb2.ReleaseKvResponse(released=True)

    async def PullKv(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        yield worker_pb2.KvChunk(layer=0)


async def _scenario() -> None:
    server = await create_grpc_server(
        "127.0.0.1", 0, [SERVICE], interceptors=[require_token(TOKEN, [SERVICE])]
    )
    servicer = Counting()
    worker_pb2_grpc.add_PrefillWorkerServicer_to_server(servicer, server.server)
    await server.start()
    await server.set_serving(True)
    address = f"127.0.0.1:{server.port}"
    release = worker_pb2.ReleaseKvRequest(request_id="someone-elses")
    try:
        for metadata in ((), ((TOKEN_METADATA, "wrong"),), ((TOKEN_METADATA, ""),)):
            async with grpc.aio.insecure_channel(address) as ch:
                stub = worker_pb2_grpc.PrefillWorkerStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ReleaseKv(release, metadata=metadata, timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "cluster credential" in (err.value.details() or "")
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in stub.PullKv(worker_pb2.PullKvRequest(request_id="x")):
                        pass
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                health = await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=SERVICE), timeout=5
                )
                assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert servicer.calls == 0  # nothing was freed or read

        cache = ChannelCache(interceptors=send_token(TOKEN))
        stub = worker_pb2_grpc.PrefillWorkerStub(cache.get_channel(address))
        assert (await stub.ReleaseKv(release, timeout=5)).released
        chunks = [c async for c in stub.PullKv(worker_pb2.PullKvRequest(request_id="x"))]
        assert len(chunks) == 1 and servicer.calls == 2
        await cache.close_all()
    finally:
        await server.stop(0)


def test_worker_methods_need_the_cluster_token() -> None:
    asyncio.run(_scenario())


def test_no_token_configured_means_no_check() -> None:
    async def scenario() -> None:
        server = await create_grpc_server(
            "127.0.0.1", 0, [SERVICE], interceptors=[require_token("", [SERVICE])]
        )
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(Counting(), server.server)
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            resp = await worker_pb2_grpc.PrefillWorkerStub(ch).ReleaseKv(
                worker_pb2.ReleaseKvRequest(request_id="r"), timeout=5
            )
        assert resp.released
        await server.stop(0)

    asyncio.run(scenario())


def test_disagg_up_closes_worker_methods_to_outsiders(tiny_model: str, tmp_path: Path) -> None:
    """Through `disagg up` (no token configured): a fresh token is made for the run, the
    system serves with it, and a client calling the workers directly is refused."""
    up = UpProcess(tiny_model, tmp_path / "up.log")
    try:
        line = up.wait_ready(READY_TIMEOUT_S)
        ids, _, last = _generate(up.address, prompt_token_ids=[5, 6, 7], max_tokens=4)
        assert len(ids) == 4 and last.finish_reason == "length"
        with grpc.insecure_channel(up.address) as ch:
            workers = {
                w.role: w.address
                for w in scheduler_pb2_grpc.SchedulerStub(ch)
                .ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=5)
                .workers
            }
        sampling = common_pb2.SamplingParams(max_tokens=2)
        calls = [
            ("prefill", "Prefill", worker_pb2.PrefillRequest(request_id="x", prompt_token_ids=[5], sampling=sampling)),
            ("prefill", "ReleaseKv", worker_pb2.ReleaseKvRequest(request_id="x")),
            ("prefill", "PullKv", worker_pb2.PullKvRequest(request_id="x")),
            ("decode", "Decode", worker_pb2.DecodeRequest(request_id="x", prompt_token_ids=[5], sampling=sampling)),
        ]  # fmt: skip
        for role, method, request in calls:
            address = workers[
                common_pb2.WORKER_ROLE_PREFILL
                if role == "prefill"
                else common_pb2.WORKER_ROLE_DECODE
            ]
            with grpc.insecure_channel(address) as ch:
                stub = (
                    worker_pb2_grpc.PrefillWorkerStub(ch)
                    if role == "prefill"
                    else worker_pb2_grpc.DecodeWorkerStub(ch)
                )
                with pytest.raises(grpc.RpcError) as err:
                    result = getattr(stub, method)(request, timeout=10)
                    if method in ("PullKv", "Decode"):
                        list(result)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (method, err.value)
        procs = system_procs(up.proc.pid, up.port)
        tokens = {
            _environ(p.pid).get("DISAGG_CLUSTER_TOKEN")
            for p in procs
            if "disagg.cli prefill" in p.cmdline or "disagg.cli decode" in p.cmdline
        }
        (token,) = tokens  # one token, shared by the workers
        assert token and len(token) >= 32
        assert all(token not in p.cmdline for p in procs) and token not in line
        assert token not in up.logs()
    finally:
        up.kill_everything(system_procs(up.proc.pid, up.port))


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(kv.decode(errors="replace").split("=", 1) for kv in raw if b"=" in kv)
