"""PrefillSession: many prefills over one stream, each answered on its own.

Real prefill and decode workers (the tiny model) in an in-process cluster with a
real Valkey; the session driven over real gRPC, by the scheduler or by hand:
- the scheduler's concurrent requests share one session per prefill worker and
  give transformers' greedy tokens; one-token requests (no decode) have their
  KV freed by a cancel on the session, not a ReleaseKv call;
- on one session: a bad prompt ends only its own request (INVALID_ARGUMENT), a
  second start of an id holding KV is refused (ALREADY_EXISTS), a cancel frees
  an answered request's KV and stops one not yet run, starts beyond the RPC
  limit are refused (RESOURCE_EXHAUSTED);
- a draining worker refuses new starts (UNAVAILABLE) and ends the session;
- a worker without the method (an older version) is called per request.
Nothing leaks in any of them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from disagg.engine.api import SamplingParams
from disagg.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.scheduler.requests import GenerationRequest
from services.scheduler.workers import WorkerClient
from tests.faults.sessions import HandSession
from tests.scheduler import factories

PROMPTS = [[5 + (i * 41 + j * 13) % 400 for j in range(20 + 3 * i)] for i in range(8)]


def _greedy(n: int) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _start(rid: str, prompt: list[int]) -> worker_pb2.PrefillRequest:
    return worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=_greedy(8))


def _pool_free(host: Any) -> bool:
    s = host.engine.stats()
    return bool(s.free_blocks == s.total_blocks and not s.held)


def test_prefills_share_one_session_and_stay_greedy(make_cluster, tiny_reference) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster()
    prefill = cluster.prefill_hosts[0]

    def one(i: int) -> list[int]:
        n = 16 if i % 2 else 1  # the odd ones decode on, the even ones end at the prefill
        ids, _, last = cluster.generate(
            prompt_token_ids=PROMPTS[i], max_tokens=n, temperature=0.0, ignore_eos=True
        )
        assert last.finish_reason == "length" and last.prefill_worker == prefill.worker_id
        assert len(last.token_ids) >= 1  # the last tokens ride in the last message
        return ids

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(one, range(len(PROMPTS))))
    assert got == [tiny_reference(p, 16 if i % 2 else 1) for i, p in enumerate(PROMPTS)]
    assert cluster.app._workers.sessions_opened == 2  # one per worker, for 8 requests each
    cluster.wait_no_leaks()
    freed = prefill.servicer.freed
    # the 4 one-token requests' KV, no decode worker took it: freed by a session cancel
    assert freed.get("failed") == 4 and freed.get("consumed") == 4
    assert not freed.get("expired")


class _Session(HandSession):
    """A hand-driven PrefillSession."""

    def __init__(self, address: str) -> None:
        super().__init__(address, lambda ch: worker_pb2_grpc.PrefillWorkerStub(ch).PrefillSession())

    def answered(self, rid: str) -> bool:
        return any(u.response.handle.request_id == rid for u in self.updates[rid])


def test_requests_are_answered_on_their_own(make_cluster, tiny_reference) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(decode=0)
    host = cluster.prefill_hosts[0]
    sender = host.servicer._sender

    async def body() -> None:
        s = _Session(host.address)
        try:
            starts = [_start("a", PROMPTS[0]), _start("bad", []), _start("c", PROMPTS[2])]
            await s.call.write(worker_pb2.PrefillSessionRequest(start=starts))
            await s.until(lambda: s.answered("a") and s.answered("c") and s.error("bad"))
            assert s.error("bad") == grpc.StatusCode.INVALID_ARGUMENT
            assert "empty" in s.updates["bad"][0].details
            a = s.updates["a"][0].response
            assert a.handle.first_token_id == tiny_reference(PROMPTS[0], 1)[0]
            assert a.handle.state == common_pb2.KV_STATE_READY
            assert sender.holds("a") and sender.holds("c")
            # "a" again while it holds KV: refused, the held KV untouched
            await s.call.write(worker_pb2.PrefillSessionRequest(start=[_start("a", PROMPTS[1])]))
            await s.until(lambda: s.error("a"))
            assert s.error("a") == grpc.StatusCode.ALREADY_EXISTS and sender.holds("a")
            # a cancel frees answered KV (the scheduler's release of KV no decode took)
            await s.call.write(worker_pb2.PrefillSessionRequest(cancel=["a", "c"]))
            await s.until(lambda: not sender.holds("a") and not sender.holds("c"))
            # started and cancelled in one message: never answered, nothing held
            await s.call.write(
                worker_pb2.PrefillSessionRequest(start=[_start("x", PROMPTS[3])], cancel=["x"])
            )
            await s.until(lambda: host.servicer._sessions.active == 0)
            await asyncio.sleep(0.2)
            assert not s.updates["x"] and not sender.holds("x")
            assert not s.ended.done()  # the session outlives its requests
        finally:
            await s.close()

    cluster.run(body(), timeout_s=60)
    assert host.servicer.freed.get("failed") == 2
    cluster.wait_no_leaks()


def test_starts_beyond_the_rpc_limit_are_refused(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(decode=0, worker={"max_concurrent_rpcs": 3})
    host = cluster.prefill_hosts[0]

    async def body() -> None:
        s = _Session(host.address)
        try:
            starts = [_start(f"r{i}", p) for i, p in enumerate(PROMPTS[:5])]
            await s.call.write(worker_pb2.PrefillSessionRequest(start=starts))
            rids = [f"r{i}" for i in range(5)]
            await s.until(lambda: all(s.answered(r) or s.error(r) for r in rids))
            assert [s.error(r) for r in rids] == [None] * 3 + [
                grpc.StatusCode.RESOURCE_EXHAUSTED
            ] * 2
            await s.call.write(worker_pb2.PrefillSessionRequest(cancel=rids[:3]))
            await s.call.write(
                worker_pb2.PrefillSessionRequest(start=[_start("again", PROMPTS[6])])
            )
            await s.until(lambda: s.answered("again"))  # the slots came back
            await s.call.write(worker_pb2.PrefillSessionRequest(cancel=["again"]))
        finally:
            await s.close()

    cluster.run(body(), timeout_s=60)
    cluster.wait_no_leaks()


def test_draining_worker_refuses_new_starts_and_ends_the_session(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(decode=0)
    host = cluster.prefill_hosts[0]

    async def body() -> None:
        s = _Session(host.address)
        try:
            await s.call.write(worker_pb2.PrefillSessionRequest(start=[_start("r", PROMPTS[4])]))
            await s.until(lambda: s.answered("r"))
            host.servicer.drain()
            await s.call.write(worker_pb2.PrefillSessionRequest(start=[_start("late", PROMPTS[5])]))
            assert await asyncio.wait_for(s.ended, 30) == grpc.StatusCode.OK
            assert s.error("late") in (None, grpc.StatusCode.UNAVAILABLE)  # refused or unread
            assert not host.servicer._sender.holds("late")
        finally:
            await s.close()
        host.servicer._sender.release("r", consumed=False)  # what the scheduler would do

    cluster.run(body(), timeout_s=60)
    cluster.wait_no_leaks()


def test_a_worker_without_sessions_is_called_per_request(make_cluster) -> None:  # type: ignore[no-untyped-def]
    """An older prefill worker (no PrefillSession: UNIMPLEMENTED) still serves: the
    client falls back to a Prefill call for it and keeps doing so."""
    cluster = make_cluster(decode=0)
    host = cluster.prefill_hosts[0]

    class Older(worker_pb2_grpc.PrefillWorkerServicer):
        def __init__(self, real: Any) -> None:
            self.Prefill, self.ReleaseKv = real.Prefill, real.ReleaseKv

    async def body() -> None:
        server = grpc.aio.server()
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(Older(host.servicer), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        client = WorkerClient(lambda _: channel, 10.0)
        view = dataclasses.replace(factories.prefill("old-0"), address=f"127.0.0.1:{port}")
        try:
            for i in range(2):
                req = GenerationRequest(
                    request_id=f"old-{i}",
                    prompt_token_ids=PROMPTS[i],
                    sampling=SamplingParams(max_tokens=4, temperature=0.0),
                )
                res = await client.prefill(view, req)
                assert res.first_token_id >= 0
                await client.release(res.handle)  # a ReleaseKv call: no session to carry it
            assert client.sessions_opened == 1  # tried once, then calls
        finally:
            await client.close()
            await channel.close()
            await server.stop(None)

    cluster.run(body(), timeout_s=60)
    assert host.servicer.freed.get("failed") == 2
    cluster.wait_no_leaks()
