"""KV handoff faults over each transport (NIXL READ, gRPC chunks).

Every scenario runs for both transports and ends the same way: the request
completes greedy-equal to transformers' generate (the decode worker falls back
to prefilling prompt + first token itself), 0 blocks are leaked on either side,
and no KV key is left in Redis.

1. Untrusted KV: a transfer with a NaN in it (in a slot past the prompt, where
   only a masked read would see it) or one block short is rejected; the rejected
   blocks are wiped, so the decode pool holds no non-finite value afterwards.
2. A lying handle: a Decode whose handle holds the KV of another prompt of the
   same length cannot file that KV in the decode worker's prefix cache; a later
   local prefill of the claimed prompt stays greedy-equal.
3. The lease runs out mid-transfer (the transfer is stalled past it): the owner
   frees its blocks (EXPIRED), the import ends FAILED.
4. The owner is SIGKILLed mid-transfer (a real prefill process; the decode worker
   in-process, stalled after the transfer began): FAILED, the decode worker marks
   and deletes the handle's record.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from disagg.engine.testing import GreedyReference, prompt_of
from disagg.kvpool.hashing import prompt_hashes
from disagg.metastore.embedded import EmbeddedValkey
from disagg.transfer import grpc_transport
from disagg.transfer.chunks import Chunk
from disagg.transfer.nixl_transport import NixlAgent
from disagg.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.cluster import Cluster
from tests.faults.conftest import flush
from tests.ports import free_port as _free_port

ROOT = Path(__file__).resolve().parents[2]
N_NEW = 10


@pytest.fixture(params=["nixl", "grpc"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _prefill(address: str, rid: str, prompt: list[int]) -> common_pb2.KvHandle:
    with grpc.insecure_channel(address) as ch:
        req = worker_pb2.PrefillRequest(
            request_id=rid,
            prompt_token_ids=prompt,
            sampling=common_pb2.SamplingParams(max_tokens=N_NEW),
        )
        return worker_pb2_grpc.PrefillWorkerStub(ch).Prefill(req, timeout=30).handle


def _decode(
    address: str, rid: str, prompt: list[int], handle: common_pb2.KvHandle | None = None
) -> tuple[list[int], worker_pb2.DecodeResponse]:
    """(tokens after the first one, the first response) of one Decode."""
    with grpc.insecure_channel(address) as ch:
        req = worker_pb2.DecodeRequest(
            request_id=rid,
            prompt_token_ids=prompt,
            sampling=common_pb2.SamplingParams(max_tokens=N_NEW),  # counts the handle's first
            handle=handle,
        )
        resps = list(worker_pb2_grpc.DecodeWorkerStub(ch).Decode(req, timeout=60))
    return [t for r in resps for t in r.token_ids], resps[0]


def _pool_is_finite(host: Any) -> bool:
    kv = host.engine.kv
    return all(bool(torch.isfinite(t).all()) for t in (*kv.k, *kv.v))


def test_nan_or_short_kv_is_rejected_and_the_request_completes_via_fallback(
    make_cluster: Any, tiny_reference: GreedyReference, transport: str
) -> None:
    cluster = make_cluster(worker={"kv_transport": transport})
    prefill, decode = cluster.prefill_hosts[0], cluster.decode_hosts[0]
    prompt = prompt_of(40, 5)  # 3 blocks, the last one 8 tokens full
    want = tiny_reference(prompt, N_NEW)
    assert len(set(want)) >= 4, "reference output not diverse"

    handle = _prefill(prefill.address, "nan-1", prompt)
    last = handle.block_ids[-1]
    prefill.engine.kv.v[1][last, 15, 0, 0] = float("nan")  # past the prompt: masked, not unused
    rest, first = _decode(decode.address, "nan-1", prompt, handle)
    assert [handle.first_token_id, *rest] == want
    assert first.prefill_ms > 0, "the decode worker should have prefilled locally"
    assert first.kv_transport == "fallback"
    assert decode.kv.metrics.totals() == {transport: (1, 1)}
    assert _pool_is_finite(decode), "rejected KV left non-finite values in the decode pool"
    prefill.engine.kv.v[1][last].zero_()  # the owner's pool is the test's to repair

    handle = _prefill(prefill.address, "short-1", prompt)
    del handle.block_ids[-1]  # one block short of the prompt
    rest, first = _decode(decode.address, "short-1", prompt, handle)
    assert [handle.first_token_id, *rest] == want and first.prefill_ms > 0
    assert decode.kv.metrics.totals() == {transport: (2, 2)}

    # A good handoff after both: imported, and greedy-equal (nothing poisoned meanwhile).
    ids, _, last = cluster.generate(prompt_token_ids=prompt, max_tokens=N_NEW, temperature=0)
    assert ids == want and last.timings.kv_transport == transport  # in the client's timings
    assert decode.kv.metrics.totals() == {transport: (3, 2)}
    cluster.wait_no_leaks()


def test_a_handle_of_another_prompt_never_enters_the_prefix_cache(
    make_cluster: Any, tiny_reference: GreedyReference, transport: str
) -> None:
    cluster = make_cluster(worker={"kv_transport": transport})
    prefill, decode = cluster.prefill_hosts[0], cluster.decode_hosts[0]
    claimed, actual = prompt_of(48, 21), prompt_of(48, 22)  # 3 full blocks each
    want = tiny_reference(claimed, N_NEW)
    assert len(set(want)) >= 4 and tiny_reference(actual, N_NEW) != want

    lie = _prefill(prefill.address, "lie-1", actual)  # KV of `actual` ...
    rest, first = _decode(decode.address, "lie-1", claimed, lie)  # ... claimed to be `claimed`
    assert first.prefill_ms == 0 and len(rest) == N_NEW - 1  # imported: the caller's own loss
    cluster.wait_no_leaks()
    allocator = decode.engine.allocator
    assert all(allocator.lookup(h) is None for h in prompt_hashes(claimed, 16))

    got, first = _decode(decode.address, "honest-1", claimed)  # a local prefill of `claimed`
    assert got == want and first.prefill_ms > 0
    cluster.wait_no_leaks()


def _stall_transfers(monkeypatch: pytest.MonkeyPatch, transport: str, hold: Any) -> None:
    """Makes every transfer of this process await hold() once it began on the owner
    (TRANSFERRING): NIXL on the reader, before its READ; gRPC on the owner, after
    serving the first chunk (a reader-side stall would not stop the owner, whose
    stream runs ahead into the connection's buffers)."""
    if transport == "nixl":
        read = NixlAgent.read

        async def stalled_read(self: NixlAgent, *args: Any) -> int:
            await hold()
            return await read(self, *args)

        monkeypatch.setattr(NixlAgent, "read", stalled_read)
        return
    serve = grpc_transport.serve

    async def stalled_serve(*args: Any) -> AsyncIterator[Any]:
        n = 0
        async for chunk in serve(*args):
            yield chunk
            n += 1
            if n == 1:
                await hold()

    monkeypatch.setattr(grpc_transport, "serve", stalled_serve)


def test_lease_expiry_mid_transfer_fails_the_import_cleanly(
    make_cluster: Any,
    tiny_reference: GreedyReference,
    transport: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lease_s = 1.0
    cluster = make_cluster(
        worker={"kv_transport": transport, "kv_lease_s": lease_s, "max_chunk_bytes": 4096}
    )
    _stall_transfers(monkeypatch, transport, lambda: asyncio.sleep(2 * lease_s))
    prompt = prompt_of(40, 9)
    want = tiny_reference(prompt, N_NEW)
    ids, _, last = cluster.generate(prompt_token_ids=prompt, max_tokens=N_NEW, temperature=0)
    assert ids == want
    assert last.decode_worker == cluster.decode_hosts[0].worker_id
    assert cluster.decode_hosts[0].kv.metrics.totals() == {transport: (1, 1)}
    assert cluster.run(_freed(cluster.prefill_hosts[0]))["expired"] == 1
    cluster.wait_no_leaks()


async def _freed(host: Any) -> dict[str, int]:
    return dict(host.servicer.freed)


# The owner process: `disagg prefill`, whose gRPC pull of a "killed-*" request stops
# after its first chunk (until the process is killed), so the kill lands mid-transfer.
_OWNER = """
import asyncio, sys
from disagg.transfer import grpc_transport
serve = grpc_transport.serve
async def stalled(sender, request_id, *args):
    n = 0
    async for chunk in serve(sender, request_id, *args):
        yield chunk
        n += 1
        if n == 1 and request_id.startswith("killed-"):
            await asyncio.sleep(3600)
grpc_transport.serve = stalled
from disagg.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture()
def prefill_process(tiny_model: str, valkey: EmbeddedValkey, tmp_path: Path) -> Iterator[Any]:
    """start(transport) -> (Popen, address) of a prefill worker process; killed at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(transport: str) -> tuple[subprocess.Popen[bytes], str]:
        port = _free_port()
        argv = [sys.executable, "-c", _OWNER, "prefill", "--model", tiny_model,
                "--redis-url", valkey.url, "--port", str(port), "--threads", "1",
                "--num-blocks", "64", "--kv-transport", transport, "--worker-id", "prefill-sub"]  # fmt: skip
        with open(tmp_path / "prefill.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
        return procs[-1], f"127.0.0.1:{port}"

    yield start
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def _wait_serving(address: str, proc: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the prefill process exited"
        try:
            with grpc.insecure_channel(address) as ch:
                grpc.channel_ready_future(ch).result(timeout=1)
                return
        except grpc.FutureTimeoutError:
            time.sleep(0.2)
    raise TimeoutError(f"{address} not up after {timeout_s}s")


def _began_transfers(
    monkeypatch: pytest.MonkeyPatch, transport: str, began: threading.Event
) -> None:
    """Sets began once a "killed-*" transfer is under way on this (the reading) side:
    NIXL stalls before its READ until the owner is dead; gRPC got the first chunk."""
    if transport == "nixl":
        read = NixlAgent.read

        async def late_read(self: NixlAgent, remote: str, src: Any, dst: Any) -> int:
            if began.is_set() or not _current_rid.startswith("killed-"):
                return await read(self, remote, src, dst)
            began.set()
            while began.is_set():  # cleared by the test once the owner is dead
                await asyncio.sleep(0.01)
            return await read(self, remote, src, dst)

        monkeypatch.setattr(NixlAgent, "read", late_read)
        return
    write = grpc_transport.write_chunks

    async def noted_write(chunks: AsyncIterable[Chunk], *args: Any) -> int:
        async def stream() -> AsyncIterable[Chunk]:
            async for chunk in chunks:
                yield chunk
                if _current_rid.startswith("killed-"):
                    began.set()

        return await write(stream(), *args)

    monkeypatch.setattr(grpc_transport, "write_chunks", noted_write)


_current_rid = ""  # the request the test is handing off now


def test_owner_killed_mid_transfer_fails_the_import_cleanly(
    tiny_model: str,
    valkey: EmbeddedValkey,
    tiny_reference: GreedyReference,
    transport: str,
    prefill_process: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    global _current_rid
    flush(valkey.url)
    proc, address = prefill_process(transport)
    began = threading.Event()
    _began_transfers(monkeypatch, transport, began)
    worker = {"kv_transport": transport, "transfer_timeout_s": 5.0, "max_chunk_bytes": 4096}
    cluster = Cluster(tiny_model, valkey.url, prefill=0, decode=1, worker=worker).start()
    try:
        _wait_serving(address, proc)
        decode = cluster.decode_hosts[0]
        prompt = prompt_of(40, 13)
        want = tiny_reference(prompt, N_NEW)
        _current_rid = "warm-1"  # a first handoff: connected, the owner's agent known
        warm = _prefill(address, _current_rid, prompt)
        rest, first = _decode(decode.address, _current_rid, prompt, warm)
        assert [warm.first_token_id, *rest] == want and first.prefill_ms == 0

        _current_rid = "killed-1"
        handle = _prefill(address, _current_rid, prompt)
        result: list[Any] = []
        t = threading.Thread(
            target=lambda: result.append(_decode(decode.address, "killed-1", prompt, handle))
        )
        t.start()
        assert began.wait(10), "the transfer never began"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        began.clear()  # NIXL: READ from the dead owner now
        t.join(30)
        ((rest, first),) = result
        assert [handle.first_token_id, *rest] == want
        assert first.prefill_ms > 0  # prefilled on the decode worker
        assert decode.kv.metrics.totals() == {transport: (2, 1)}
        cluster.wait_no_leaks()  # the decode pool full, the dead owner's record deleted
    finally:
        began.clear()
        cluster.stop()


def test_a_handoff_the_decode_worker_refuses_is_released_by_the_scheduler(
    make_cluster: Any, tiny_reference: GreedyReference
) -> None:
    """The decode worker's registry listing lacks the prefill worker (its record expired,
    say, while the scheduler still routes to it): the decode worker contacts no such owner
    and prefills locally; the scheduler, which chose the owner from its own registry,
    releases the held KV at once instead of leaving it to the lease."""
    cluster = make_cluster(worker={"kv_transport": "grpc"})
    owners = cluster.decode_hosts[0].servicer._owners

    async def nothing_registered() -> list[common_pb2.WorkerInfo]:
        return []

    owners._list, owners._owners = nothing_registered, frozenset()
    prompt = prompt_of(40, 9)
    ids, _, last = cluster.generate(prompt_token_ids=prompt, max_tokens=N_NEW, temperature=0)
    assert ids == tiny_reference(prompt, N_NEW)
    assert last.timings.kv_transport == "fallback" and last.prefill_worker.startswith("prefill-")
    assert cluster.decode_hosts[0].kv.metrics.totals() == {"refused": (1, 1)}  # not contacted
    prefill = cluster.prefill_hosts[0]
    assert prefill.cfg.kv_lease_s >= 30
    cluster.wait_no_leaks(timeout_s=3.0)  # released, not expired
    assert prefill.servicer.freed == {"consumed": 0, "failed": 1, "expired": 0}
