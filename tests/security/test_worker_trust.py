"""Workers and the scheduler dial only registered workers; every server caps its RPCs.

One in-process cluster (real gRPC on loopback, real Valkey, the tiny model; a
cluster token, as `disagg up` runs it; small ``max_concurrent_rpcs``). The
attacks go through real gRPC clients; a ``Listener`` -- a TCP socket that counts
the connections made to it -- stands at every forged address.

1. A forged KV handle sent to the decode worker (a caller holding the cluster
   token: the decode worker must not trust whoever wrote the handle):
   - an owner that is not a registered prefill worker (unknown address; a
     registered worker's id at another address; a registered address under
     another id): refused without any connection (the listener accepts
     nothing), the prompt prefilled locally, the stream greedy-equal;
   - a real handle of another request (the request ids differ): refused, and
     that request's KV is neither read nor released (its owner still holds it);
   - control: once an owner is registered at the listener's address, the same
     handle makes the decode worker dial it (the listener sees it), so the
     socket does observe connection attempts.
2. Pins (``prefill_worker`` / ``decode_worker``) to an address that is not a
   registered worker of that role: UNAVAILABLE, no connection; control: pinned
   to a registered fake, the scheduler dials it.
3. ``max_concurrent_rpcs`` from the configs reaches the real servers: with the
   limit filled by health Watch streams, one more call is RESOURCE_EXHAUSTED.
Leak check (blocks, held KV, Redis keys) after each.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from disagg.engine.testing import GreedyReference
from disagg.metastore.embedded import EmbeddedValkey
from disagg.metastore.store import MetaStore
from disagg.runtime.cluster_auth import TOKEN_METADATA
from disagg.v1 import common_pb2, scheduler_pb2, worker_pb2, worker_pb2_grpc
from tests.cluster import Cluster

TOKEN = "worker-trust-test-token"
AUTH = ((TOKEN_METADATA, TOKEN),)
WORKER_RPCS, SCHEDULER_RPCS = 4, 6
PROMPT = [5, 6, 7, 8, 9, 10, 11]
MAX_TOKENS = 6


class Listener:
    """A TCP socket on 127.0.0.1 counting the connections it accepts (each closed at once)."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@pytest.fixture(scope="module")
def trust_cluster(tiny_model: str, valkey: EmbeddedValkey) -> Iterator[Cluster]:
    with redis.Redis.from_url(valkey.url) as r:
        r.flushall()
    cluster = Cluster(
        tiny_model,
        valkey.url,
        worker={"cluster_token": TOKEN, "max_concurrent_rpcs": WORKER_RPCS},
        scheduler={
            "cluster_token": TOKEN,
            "max_concurrent_rpcs": SCHEDULER_RPCS,
            "max_inflight": SCHEDULER_RPCS - 2,
        },
    ).start()
    yield cluster
    cluster.stop()


@pytest.fixture()
def listener() -> Iterator[Listener]:
    lis = Listener()
    yield lis
    lis.close()


def _prefill(cluster: Cluster, request_id: str) -> common_pb2.KvHandle:
    """A real prefill on the prefill worker (as the scheduler does it): its handle."""
    with grpc.insecure_channel(cluster.prefill_hosts[0].address) as ch:
        resp = worker_pb2_grpc.PrefillWorkerStub(ch).Prefill(
            worker_pb2.PrefillRequest(
                request_id=request_id,
                prompt_token_ids=PROMPT,
                sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS),
            ),
            metadata=AUTH,
            timeout=30,
        )
    return resp.handle


def _release(cluster: Cluster, request_id: str) -> bool:
    with grpc.insecure_channel(cluster.prefill_hosts[0].address) as ch:
        resp = worker_pb2_grpc.PrefillWorkerStub(ch).ReleaseKv(
            worker_pb2.ReleaseKvRequest(request_id=request_id), metadata=AUTH, timeout=10
        )
    return bool(resp.released)


def _decode(cluster: Cluster, request_id: str, handle: common_pb2.KvHandle) -> list[int]:
    """Decode with handle on the decode worker, as its caller: the first token + the rest."""
    with grpc.insecure_channel(cluster.decode_hosts[0].address) as ch:
        stream = worker_pb2_grpc.DecodeWorkerStub(ch).Decode(
            worker_pb2.DecodeRequest(
                request_id=request_id,
                prompt_token_ids=PROMPT,
                sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS),
                handle=handle,
            ),
            metadata=AUTH,
            timeout=60,
        )
        rest = [t for resp in stream for t in resp.token_ids]
    return [handle.first_token_id, *rest]


def _refused(cluster: Cluster) -> int:
    """Handles the decode worker refused before contacting their owner."""
    return cluster.decode_hosts[0].kv.metrics.totals().get("refused", (0, 0))[1]


def _forged(handle: common_pb2.KvHandle, **fields: Any) -> common_pb2.KvHandle:
    out = common_pb2.KvHandle()
    out.CopyFrom(handle)
    for name, value in fields.items():
        setattr(out, name, value)
    return out


def _with_fake_prefill(cluster: Cluster, address: str, fn: Callable[[], Any]) -> Any:
    """fn() while a prefill worker "prefill-fake" at address is registered (a copy of the
    real one's record); the record is removed afterwards."""

    async def register(remove: bool) -> None:
        store = MetaStore(cluster.redis_url)
        try:
            if remove:
                await store.remove_worker("prefill-fake")
                return
            (real,) = await store.list_workers(common_pb2.WORKER_ROLE_PREFILL)
            fake = common_pb2.WorkerInfo()
            fake.CopyFrom(real)
            fake.worker_id, fake.address = "prefill-fake", address
            await store.register_worker(fake, ttl_s=60.0)
        finally:
            await store.close()

    cluster.run(register(False))
    try:
        return fn()
    finally:
        cluster.run(register(True))
        # Gone from the scheduler's view too before the next test routes (after a slow
        # Redis call, the registry keeps vanished workers for a few seconds).
        _wait(lambda: not _listed(cluster, address), "the fake worker left the registry")


def _listed(cluster: Cluster, address: str) -> bool:
    workers = cluster.stub().ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=10).workers
    return any(w.address == address for w in workers)


def _wait(cond: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"not after {timeout_s}s: {what}"
        time.sleep(0.05)


def test_forged_owner_is_refused_without_a_connection(
    trust_cluster: Cluster, tiny_reference: GreedyReference, listener: Listener
) -> None:
    cluster = trust_cluster
    want = tiny_reference(PROMPT, MAX_TOKENS)
    real = cluster.prefill_hosts[0]
    handle = _prefill(cluster, "victim")
    assert handle.owner_address == real.address and handle.first_token_id == want[0]
    forgeries = [
        {"owner_address": listener.address, "owner_worker_id": "prefill-evil"},
        {"owner_address": listener.address},  # a registered worker's id, another address
        {"owner_worker_id": "prefill-evil"},  # a registered address, another id
    ]
    before = _refused(cluster)
    for fields in forgeries:
        assert _decode(cluster, "victim", _forged(handle, **fields)) == want, fields
    assert _refused(cluster) == before + len(forgeries)
    time.sleep(0.2)
    assert listener.accepted == 0  # never dialed
    assert _release(cluster, "victim")  # the real owner still held it: nothing was pulled
    cluster.wait_no_leaks()


def test_a_registered_owner_is_dialed(
    trust_cluster: Cluster, tiny_reference: GreedyReference, listener: Listener
) -> None:
    """The control of the test above: the listener does see a decode worker's dial."""
    cluster = trust_cluster
    want = tiny_reference(PROMPT, MAX_TOKENS)
    handle = _prefill(cluster, "control")
    assert _release(cluster, "control")  # only its fields are needed
    fake = _forged(handle, owner_address=listener.address, owner_worker_id="prefill-fake")

    def until_dialed() -> None:
        for _ in range(10):  # a listing slower than the 0.5 s a miss waits: refused, retry
            time.sleep(0.2)  # past the decode worker's minimum interval between listings
            # The pull fails (the listener hangs up): prefilled locally, greedy-equal.
            assert _decode(cluster, "control", fake) == want
            if listener.accepted:
                return

    _with_fake_prefill(cluster, listener.address, until_dialed)
    assert listener.accepted >= 1
    cluster.wait_no_leaks()


def test_another_requests_handle_is_neither_read_nor_released(
    trust_cluster: Cluster, tiny_reference: GreedyReference
) -> None:
    cluster = trust_cluster
    handle = _prefill(cluster, "owner-of-the-kv")
    assert _decode(cluster, "thief", handle) == tiny_reference(PROMPT, MAX_TOKENS)
    assert cluster.prefill_hosts[0].engine.stats().held  # type: ignore[union-attr]
    _wait(lambda: cluster.kv_keys() == 1, "its record in Redis")  # (mirrored in the background)
    assert _release(cluster, "owner-of-the-kv")  # still held by its owner: not pulled
    cluster.wait_no_leaks()


def test_registered_owners_still_serve(
    trust_cluster: Cluster, tiny_reference: GreedyReference
) -> None:
    ids, _, last = trust_cluster.generate(
        prompt_token_ids=PROMPT, max_tokens=MAX_TOKENS, temperature=0
    )
    assert ids == tiny_reference(PROMPT, MAX_TOKENS)
    assert last.timings.kv_transfer_ms > 0 and last.prefill_worker.startswith("prefill-")
    trust_cluster.wait_no_leaks()


@pytest.mark.parametrize("pin", ["prefill_worker", "decode_worker"])
def test_pins_to_unregistered_addresses_dial_nothing(
    trust_cluster: Cluster, listener: Listener, pin: str
) -> None:
    cluster = trust_cluster
    other = cluster.prefill_hosts[0].address if pin == "decode_worker" else "nobody-1"
    for target in (listener.address, "prefill-evil", other):  # other: a worker of another role
        req = scheduler_pb2.GenerateRequest(prompt_token_ids=PROMPT, max_tokens=2, **{pin: target})
        with pytest.raises(grpc.RpcError) as err:
            list(cluster.stub().Generate(req, timeout=30))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, target
        assert pin in (err.value.details() or "") and "registry" in (err.value.details() or "")
    time.sleep(0.2)
    assert listener.accepted == 0
    cluster.wait_no_leaks()


def test_a_pin_to_a_registered_worker_is_dialed(trust_cluster: Cluster, listener: Listener) -> None:
    """The control: pinned to a registered (fake) prefill worker, the scheduler dials it."""
    cluster = trust_cluster

    def attempt() -> None:
        _wait(lambda: _listed(cluster, listener.address), "the fake worker in the registry")
        req = scheduler_pb2.GenerateRequest(
            prompt_token_ids=PROMPT, max_tokens=2, prefill_worker=listener.address
        )
        with pytest.raises(grpc.RpcError) as err:
            list(cluster.stub().Generate(req, timeout=30))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    _with_fake_prefill(cluster, listener.address, attempt)
    assert listener.accepted >= 1
    cluster.wait_no_leaks()


def _limit_reached(address: str, limit: int) -> None:
    """limit health Watch streams open on address: one more call is RESOURCE_EXHAUSTED."""
    with grpc.insecure_channel(address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        watches = [health.Watch(health_pb2.HealthCheckRequest()) for _ in range(limit)]
        try:
            for w in watches:
                next(w)  # each is running on the server
            with pytest.raises(grpc.RpcError) as err:
                health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, address
        finally:
            for w in watches:
                w.cancel()
        deadline = time.monotonic() + 5
        while True:  # and serves again once they are gone
            try:
                health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                return
            except grpc.RpcError:
                assert time.monotonic() < deadline
                time.sleep(0.05)


def test_configured_rpc_limits_reach_every_server(trust_cluster: Cluster) -> None:
    cluster = trust_cluster
    _limit_reached(cluster.address, SCHEDULER_RPCS)
    cluster.run(cluster.app._workers.close())  # its session calls would count as well
    for host in cluster.hosts:
        _limit_reached(host.address, WORKER_RPCS)
