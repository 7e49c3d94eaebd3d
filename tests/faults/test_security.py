"""TLS/mTLS on every gRPC link, loopback-only binds, no pickle/marshal/eval on any wire.

Under mTLS the workers' own methods (PrefillWorker Prefill/PrefillStream/WatchKv/
PullKv/StartKvRead/ReleaseKv, DecodeWorker Decode) refuse a plaintext client (no TLS handshake:
UNAVAILABLE) and a client certificate of the cluster's own CA that names no
cluster role (PERMISSION_DENIED, with or without the cluster token), while the
scheduler (its certificate names the scheduler role) and the decode worker
(the worker role) reach them."""

from __future__ import annotations

import ast
import os
import pathlib
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from disagg.runtime.cluster_auth import TOKEN_METADATA
from disagg.runtime.config import SchedulerConfig, WorkerConfig
from disagg.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.faults.pki import Pki, make_pki

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _creds(ca: str, cert: str | None = None, key: str | None = None) -> grpc.ChannelCredentials:
    read = lambda p: pathlib.Path(p).read_bytes() if p else None  # noqa: E731
    return grpc.ssl_channel_credentials(read(ca), read(key), read(cert))


def _call(address: str, creds: grpc.ChannelCredentials | None) -> list[int]:
    channel = (
        grpc.insecure_channel(address) if creds is None else grpc.secure_channel(address, creds)
    )
    with channel:
        req = scheduler_pb2.GenerateRequest(prompt_token_ids=[5, 6, 7], max_tokens=4, temperature=0)
        return [
            t
            for r in scheduler_pb2_grpc.SchedulerStub(channel).Generate(req, timeout=10)
            for t in r.token_ids
        ]


def test_mtls_on_every_link(make_cluster, tmp_path: pathlib.Path) -> None:  # type: ignore[no-untyped-def]
    pki = make_pki(tmp_path)
    worker = {"tls_cert": pki.cert, "tls_key": pki.key, "tls_ca": pki.ca, "cluster_token": TOKEN}
    scheduler = {**worker, "tls_cert": pki.scheduler_cert, "tls_key": pki.scheduler_key}
    good = _creds(pki.ca, pki.client_cert, pki.client_key)  # a client's certificate
    cluster = make_cluster(worker=worker, scheduler=scheduler, credentials=good)
    ids, _, last = cluster.generate(prompt_token_ids=[5, 6, 7], max_tokens=12, temperature=0)
    assert len(ids) == 12
    assert last.timings.kv_transfer_ms > 0  # decode pulled from prefill over mTLS
    assert last.prefill_worker.startswith("prefill-")  # scheduler -> prefill over mTLS
    for creds, what in (
        (None, "plaintext client"),
        (_creds(pki.ca), "TLS client without a certificate"),
        (_creds(pki.ca, pki.rogue_cert, pki.rogue_key), "client certificate from another CA"),
        (_creds(pki.rogue_ca, pki.cert, pki.key), "client that trusts another CA"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            _call(cluster.address, creds)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, what
    _workers_refuse_outsiders(cluster, pki)
    assert _call(cluster.address, good) == ids[:4]
    cluster.wait_no_leaks()


TOKEN = "security-test-token"
AUTH = ((TOKEN_METADATA, TOKEN),)
SAMPLING = common_pb2.SamplingParams(max_tokens=2)
HELD = "held-by-prefill"


def _worker_methods(channel: grpc.Channel, role: str) -> list[tuple[str, Callable[..., Any]]]:
    """Every method of the worker role's own service, each a call run to its end."""
    if role == "decode":
        decode = worker_pb2_grpc.DecodeWorkerStub(channel)
        request = worker_pb2.DecodeRequest(request_id="x", prompt_token_ids=[5], sampling=SAMPLING)
        return [("Decode", lambda **kw: list(decode.Decode(request, timeout=10, **kw)))]
    prefill = worker_pb2_grpc.PrefillWorkerStub(channel)
    pre = worker_pb2.PrefillRequest(request_id="x", prompt_token_ids=[5], sampling=SAMPLING)
    pull = worker_pb2.PullKvRequest(request_id=HELD)  # a real request's KV, held by the test
    start = worker_pb2.StartKvReadRequest(request_id=HELD)
    release = worker_pb2.ReleaseKvRequest(request_id=HELD)
    stream = worker_pb2.PrefillStreamRequest(prefill=pre)
    watch = worker_pb2.WatchKvRequest(request_id=HELD)
    return [
        ("Prefill", lambda **kw: prefill.Prefill(pre, timeout=10, **kw)),
        ("PrefillStream", lambda **kw: list(prefill.PrefillStream(stream, timeout=10, **kw))),
        ("WatchKv", lambda **kw: list(prefill.WatchKv(watch, timeout=10, **kw))),
        ("PullKv", lambda **kw: list(prefill.PullKv(pull, timeout=10, **kw))),
        ("StartKvRead", lambda **kw: prefill.StartKvRead(start, timeout=10, **kw)),
        ("ReleaseKv", lambda **kw: prefill.ReleaseKv(release, timeout=10, **kw)),
    ]


def _workers_refuse_outsiders(cluster, pki: Pki) -> None:  # type: ignore[no-untyped-def]
    """Each worker's own methods, both roles: a plaintext client cannot connect
    (UNAVAILABLE); a client's certificate from the cluster's CA, even with the cluster
    token, is PERMISSION_DENIED; KV held by the prefill worker is neither read nor freed."""
    prefill, decode = cluster.prefill_hosts[0], cluster.decode_hosts[0]
    member = _creds(pki.ca, pki.scheduler_cert, pki.scheduler_key)
    with grpc.secure_channel(prefill.address, member) as ch:
        held = worker_pb2.PrefillRequest(
            request_id=HELD, prompt_token_ids=[5, 6], sampling=SAMPLING
        )
        worker_pb2_grpc.PrefillWorkerStub(ch).Prefill(held, metadata=AUTH, timeout=30)
    client = _creds(pki.ca, pki.client_cert, pki.client_key)
    for host, role in ((prefill, "prefill"), (decode, "decode")):
        with grpc.insecure_channel(host.address) as ch:
            for name, call in _worker_methods(ch, role):
                with pytest.raises(grpc.RpcError) as err:
                    call(metadata=AUTH)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (role, name, "plaintext")
        with grpc.secure_channel(host.address, client) as ch:
            for metadata in (AUTH, ()):
                for name, call in _worker_methods(ch, role):
                    with pytest.raises(grpc.RpcError) as err:
                        call(metadata=metadata)
                    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (role, name)
    assert prefill.engine.stats().held  # still held: nothing pulled or released
    with grpc.secure_channel(prefill.address, member) as ch:
        released = worker_pb2_grpc.PrefillWorkerStub(ch).ReleaseKv(
            worker_pb2.ReleaseKvRequest(request_id=HELD), metadata=AUTH, timeout=10
        )
    assert released.released


def test_defaults_bind_loopback_only() -> None:
    assert SchedulerConfig().host == "127.0.0.1"
    assert WorkerConfig().host == "127.0.0.1"


def _socket_inodes(pid: int | str = "self") -> set[str]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # the process is gone
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


_LOOPBACK = {
    "/proc/net/tcp": {"0100007F"},  # 127.0.0.1
    "/proc/net/tcp6": {
        "00000000000000000000000001000000",  # ::1
        "0000000000000000FFFF00000100007F",  # ::ffff:127.0.0.1
    },
}


def _listening(inodes: set[str]) -> list[tuple[str, str]]:
    """(table, local address) of every TCP socket in LISTEN among inodes."""
    found = []
    for table in _LOOPBACK:
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state == "0A" and inode in inodes:
                    found.append((table, local))
    return found


def _beyond_loopback(listening: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(t, a) for t, a in listening if a.split(":")[0] not in _LOOPBACK[t]]


def test_running_services_listen_on_loopback_only(tiny_cluster) -> None:  # type: ignore[no-untyped-def]
    listening = _listening(_socket_inodes())
    assert not _beyond_loopback(listening), listening
    assert len(listening) >= 3  # scheduler, prefill, decode


def test_disagg_up_listens_on_loopback_only(tiny_model: str, tmp_path: pathlib.Path) -> None:
    """Every listener of the whole `disagg up` process tree -- gRPC of the scheduler and the
    workers, the HTTP front with /metrics, the workers' /metrics, the embedded Valkey, and
    NIXL's listeners -- binds loopback when no address is configured."""
    from tests.e2e.test_up import READY_TIMEOUT_S, UpProcess, _free_port, system_procs

    http_port = _free_port()
    up = UpProcess(
        tiny_model,
        tmp_path / "up.log",
        ("--http-port", str(http_port)),
        env={"DISAGG_METRICS_PORT": "0"},  # the workers' /metrics on, on free ports
    )
    procs = []
    try:
        up.wait_ready(READY_TIMEOUT_S)
        procs = system_procs(up.proc.pid, up.port)
        listening = _listening(set().union(*(_socket_inodes(p.pid) for p in procs)))
        assert not _beyond_loopback(listening), listening
        ports = {int(a.rsplit(":", 1)[1], 16) for _, a in listening}
        assert {up.port, http_port} <= ports
        assert any("valkey" in p.cmdline for p in procs)
        # scheduler gRPC + HTTP, two workers' gRPC and /metrics, Valkey
        assert len(ports) >= 7, (listening, [p.cmdline for p in procs])
    finally:
        up.kill_everything(procs or system_procs(up.proc.pid, up.port))


def test_no_pickle_marshal_or_eval_in_the_package() -> None:
    banned_modules = {"pickle", "cPickle", "marshal", "dill", "cloudpickle", "shelve"}
    offenders = []
    for folder in ("disagg", "services"):
        for path in (ROOT / folder).rglob("*.py"):
            if "_pb2" in path.name:
                continue
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    names = (
                        [a.name for a in node.names]
                        if isinstance(node, ast.Import)
                        else [node.module or ""]
                    )
                    offenders += [
                        f"{path}: import {n}" for n in names if n.split(".")[0] in banned_modules
                    ]
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name)
                    and node.func.id in ("eval", "exec")
                ):
                    offenders.append(f"{path}:{node.lineno}: {node.func.id}()")
    assert not offenders, offenders


def test_no_pickle_based_weight_loading() -> None:
    # Weights load from safetensors; torch.load (pickle) never runs on a model path.
    src = "\n".join(p.read_text() for p in (ROOT / "disagg").rglob("*.py"))
    assert "torch.load(" not in src and "weights_only=False" not in src
