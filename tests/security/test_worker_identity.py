"""Under mTLS, worker methods need a cluster role in the peer's certificate, and the token.

A real grpc.aio server on 127.0.0.1 with mTLS (a test CA, tests/faults/pki.py),
the worker interceptor as a worker installs it (``require_token`` with
``tls.required_peer_uris``), and PrefillWorker + DecodeWorker servicers that
count what reaches them. Callers, each over a real TLS channel:
- a client's certificate from the same CA (URI SAN spiffe://disagg/client), with
  or without the cluster token: PERMISSION_DENIED on every worker method, and no
  method body runs; health stays open to it;
- a worker's certificate without the token: UNAUTHENTICATED (both checks hold);
- a worker's or a scheduler's certificate with the token: served.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from disagg.runtime.cluster_auth import TOKEN_METADATA, require_token
from disagg.runtime.grpc_server import create_grpc_server
from disagg.runtime.tls import TlsFiles, required_peer_uris, server_credentials
from disagg.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.faults.pki import Pki, make_pki

PREFILL = "disagg.v1.PrefillWorker"
DECODE = "disagg.v1.DecodeWorker"
TOKEN = "identity-test-token"
SAMPLING = common_pb2.SamplingParams(max_tokens=2)


class Counting(worker_pb2_grpc.PrefillWorkerServicer, worker_pb2_grpc.DecodeWorkerServicer):
    """Every worker method; counts the calls that reach a method body."""

    def __init__(self) -> None:
        self.calls = 0

    async def Prefill(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        return worker_pb2.PrefillResponse()

    async def PullKv(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        yield worker_pb2.KvChunk(layer=0)

    async def ReleaseKv(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        return worker_pb2.ReleaseKvResponse(released=True)

    async def StartKvRead(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        return worker_pb2.StartKvReadResponse()

    async def PrefillStream(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        yield worker_pb2.PrefillStreamResponse()

    async def WatchKv(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        yield worker_pb2.KvProgress(done=True)

    async def Decode(self, request, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        yield worker_pb2.DecodeResponse(token_ids=[1], finish_reason="length")

    async def PrefillSession(self, request_iterator, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        async for msg in request_iterator:
            for req in msg.start:
                update = worker_pb2.PrefillSessionUpdate(
                    request_id=req.request_id, response=worker_pb2.PrefillResponse()
                )
                yield worker_pb2.PrefillSessionResponse(updates=[update])
            return

    async def DecodeSession(self, request_iterator, context):  # type: ignore[no-untyped-def]
        self.calls += 1
        async for msg in request_iterator:
            for req in msg.start:
                done = worker_pb2.DecodeResponse(token_ids=[1], finish_reason="length")
                update = worker_pb2.DecodeSessionUpdate(request_id=req.request_id, response=done)
                yield worker_pb2.DecodeSessionResponse(updates=[update])
            return


def worker_calls(channel: grpc.aio.Channel) -> list[tuple[str, Any]]:
    """(name, a coroutine function running it to the end) per worker method."""
    prefill = worker_pb2_grpc.PrefillWorkerStub(channel)
    decode = worker_pb2_grpc.DecodeWorkerStub(channel)
    pre = worker_pb2.PrefillRequest(request_id="x", prompt_token_ids=[5], sampling=SAMPLING)
    dec = worker_pb2.DecodeRequest(request_id="x", prompt_token_ids=[5], sampling=SAMPLING)
    pull = worker_pb2.PullKvRequest(request_id="x")
    release = worker_pb2.ReleaseKvRequest(request_id="x")
    start = worker_pb2.StartKvReadRequest(request_id="x")
    stream = worker_pb2.PrefillStreamRequest(prefill=pre)
    watch = worker_pb2.WatchKvRequest(request_id="x")
    session = worker_pb2.DecodeSessionRequest(start=[dec])
    prefills = worker_pb2.PrefillSessionRequest(start=[pre])

    async def drain(call: Any) -> list[Any]:
        return [m async for m in call]

    return [
        ("Prefill", lambda **kw: prefill.Prefill(pre, timeout=5, **kw)),
        ("PullKv", lambda **kw: drain(prefill.PullKv(pull, timeout=5, **kw))),
        ("ReleaseKv", lambda **kw: prefill.ReleaseKv(release, timeout=5, **kw)),
        ("StartKvRead", lambda **kw: prefill.StartKvRead(start, timeout=5, **kw)),
        ("PrefillStream", lambda **kw: drain(prefill.PrefillStream(stream, timeout=5, **kw))),
        ("WatchKv", lambda **kw: drain(prefill.WatchKv(watch, timeout=5, **kw))),
        (
            "PrefillSession",
            lambda **kw: drain(
                prefill.PrefillSession(iter([prefills]), timeout=5, **kw)  # type: ignore[arg-type]
            ),
        ),
        ("Decode", lambda **kw: drain(decode.Decode(dec, timeout=5, **kw))),
        (
            "DecodeSession",
            lambda **kw: drain(
                decode.DecodeSession(iter([session]), timeout=5, **kw)  # type: ignore[arg-type]
            ),
        ),
    ]


def _creds(pki: Pki, cert: str, key: str) -> grpc.ChannelCredentials:
    read = lambda p: Path(p).read_bytes()  # noqa: E731
    return grpc.ssl_channel_credentials(read(pki.ca), read(key), read(cert))


async def _scenario(pki: Pki) -> None:
    tls = TlsFiles(cert=pki.cert, key=pki.key, ca=pki.ca)
    server = await create_grpc_server(
        "127.0.0.1",
        0,
        [PREFILL, DECODE],
        credentials=server_credentials(tls),
        interceptors=[require_token(TOKEN, [PREFILL, DECODE], required_peer_uris(tls))],
    )
    servicer = Counting()
    worker_pb2_grpc.add_PrefillWorkerServicer_to_server(servicer, server.server)
    worker_pb2_grpc.add_DecodeWorkerServicer_to_server(servicer, server.server)
    await server.start()
    await server.set_serving(True)
    address = f"localhost:{server.port}"
    token = ((TOKEN_METADATA, TOKEN),)
    try:
        client = _creds(pki, pki.client_cert, pki.client_key)
        async with grpc.aio.secure_channel(address, client) as ch:
            for metadata in (token, ()):
                for name, call in worker_calls(ch):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call(metadata=metadata)
                    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
                    assert "cluster role" in (err.value.details() or ""), name
            health = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=PREFILL), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert servicer.calls == 0  # no method body ran: nothing read, freed or run

        worker = _creds(pki, pki.cert, pki.key)
        async with grpc.aio.secure_channel(address, worker) as ch:
            for name, call in worker_calls(ch):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        assert servicer.calls == 0

        scheduler = _creds(pki, pki.scheduler_cert, pki.scheduler_key)
        for creds in (worker, scheduler):
            async with grpc.aio.secure_channel(address, creds) as ch:
                for _name, call in worker_calls(ch):
                    await call(metadata=token)
        assert servicer.calls == 2 * len(worker_calls(ch))
    finally:
        await server.stop(0)


def test_worker_methods_need_a_cluster_role_under_mtls(tmp_path: Path) -> None:
    asyncio.run(_scenario(make_pki(tmp_path)))


def test_no_role_is_required_without_client_certificates(tmp_path: Path) -> None:
    """TLS without a CA (no client certificates to read) or no TLS: the token alone."""
    pki = make_pki(tmp_path)
    assert required_peer_uris(TlsFiles()) == ()
    assert required_peer_uris(TlsFiles(cert=pki.cert, key=pki.key)) == ()
    assert required_peer_uris(TlsFiles(cert=pki.cert, key=pki.key, ca=pki.ca))
