"""DecodeSession: many requests over one stream, each ending on its own.

Real decode workers (the tiny model) in an in-process cluster with a real
Valkey; the session driven over real gRPC, by the scheduler or by hand:
- the scheduler's concurrent streams share one session per decode worker and
  give transformers' greedy tokens;
- on one session: a bad prompt ends only its own request (INVALID_ARGUMENT), a
  duplicate id is refused (ALREADY_EXISTS) without touching the running one, a
  cancelled request stops and frees its blocks, the others complete exactly;
- a draining worker refuses new starts (UNAVAILABLE), finishes the running
  ones, then ends the session; closing the session cancels what is left on it.
Nothing leaks in any of them.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from disagg.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.faults.sessions import HandSession

PROMPTS = [[5 + (i * 37 + j * 11) % 400 for j in range(6 + 3 * i)] for i in range(8)]


def _greedy(n: int) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def _start(rid: str, prompt: list[int], n: int) -> worker_pb2.DecodeRequest:
    return worker_pb2.DecodeRequest(request_id=rid, prompt_token_ids=prompt, sampling=_greedy(n))


def _generate_all(cluster: Any) -> list[list[int]]:
    def one(prompt: list[int]) -> list[int]:
        ids, _, last = cluster.generate(
            prompt_token_ids=prompt, max_tokens=24, temperature=0.0, ignore_eos=True
        )
        assert last.finish_reason == "length"
        return ids

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(one, PROMPTS))


def test_streams_share_one_session_and_stay_greedy(make_cluster, tiny_reference) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(prefill=0)
    got = _generate_all(cluster)
    assert got == [tiny_reference(p, 24) for p in PROMPTS]  # request by request
    assert cluster.app._workers.sessions_opened == 1  # 8 concurrent streams, one session
    cluster.wait_no_leaks()


class _Session(HandSession):
    """A hand-driven DecodeSession."""

    def __init__(self, address: str) -> None:
        super().__init__(address, lambda ch: worker_pb2_grpc.DecodeWorkerStub(ch).DecodeSession())

    def tokens(self, rid: str) -> list[int]:
        return [t for u in self.updates[rid] for t in u.response.token_ids]

    def finish(self, rid: str) -> str:
        ups = self.updates[rid]
        return ups[-1].response.finish_reason if ups else ""


def test_requests_end_on_their_own(make_cluster, tiny_reference) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(prefill=0)
    address = cluster.decode_hosts[0].address

    async def body() -> None:
        s = _Session(address)
        try:
            starts = [
                _start("a", PROMPTS[0], 40),
                _start("bad", [], 5),
                _start("c", PROMPTS[2], 400),
                _start("d", PROMPTS[3], 12),
            ]
            await s.call.write(worker_pb2.DecodeSessionRequest(start=starts))
            await s.until(lambda: s.tokens("c"))
            await s.call.write(  # a duplicate of the running "a", and c cancelled
                worker_pb2.DecodeSessionRequest(start=[_start("a", PROMPTS[1], 3)], cancel=["c"])
            )
            await s.until(lambda: s.finish("a") and s.finish("d") and s.error("a"))
            assert s.error("bad") == grpc.StatusCode.INVALID_ARGUMENT
            assert "empty" in s.updates["bad"][0].details
            assert s.error("a") == grpc.StatusCode.ALREADY_EXISTS  # refused, "a" untouched
            assert s.tokens("a") == tiny_reference(PROMPTS[0], 40)
            assert s.tokens("d") == tiny_reference(PROMPTS[3], 12)
            assert s.finish("a") == s.finish("d") == "length"
            n = len(s.tokens("c"))
            await asyncio.sleep(0.3)
            assert not s.finish("c") and len(s.tokens("c")) == n  # nothing after the cancel
            assert n < 400
            assert not s.ended.done()  # the session outlives its requests
            # started and cancelled in one message: cancelled before it ever ran
            await s.call.write(
                worker_pb2.DecodeSessionRequest(start=[_start("x", PROMPTS[3], 9)], cancel=["x"])
            )
            sessions = cluster.decode_hosts[0].servicer._sessions
            await s.until(lambda: sessions.active == 0)
            assert not s.updates["x"]
            long = [_start(f"r{i}", p, 500) for i, p in enumerate(PROMPTS[4:7])]
            await s.call.write(worker_pb2.DecodeSessionRequest(start=long))
            await s.until(lambda: all(s.tokens(f"r{i}") for i in range(3)))
        finally:
            await s.close()  # with r0-r2 running: closing the session cancels them

    cluster.run(body(), timeout_s=60)
    cluster.wait_no_leaks()


def test_draining_worker_finishes_then_ends_the_session(make_cluster, tiny_reference) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(prefill=0)
    host = cluster.decode_hosts[0]

    async def body() -> None:
        s = _Session(host.address)
        try:
            await s.call.write(worker_pb2.DecodeSessionRequest(start=[_start("r", PROMPTS[4], 60)]))
            await s.until(lambda: s.tokens("r"))
            host.servicer.drain()
            await s.call.write(
                worker_pb2.DecodeSessionRequest(start=[_start("late", PROMPTS[5], 4)])
            )
            assert await asyncio.wait_for(s.ended, 30) == grpc.StatusCode.OK  # after "r"
            assert s.error("late") == grpc.StatusCode.UNAVAILABLE
            assert s.tokens("r") == tiny_reference(PROMPTS[4], 60)
            assert s.finish("r") == "length"
        finally:
            await s.close()

    cluster.run(body(), timeout_s=60)
    cluster.wait_no_leaks()


def test_requests_beyond_the_rpc_limit_are_refused(make_cluster) -> None:  # type: ignore[no-untyped-def]
    cluster = make_cluster(prefill=0, worker={"max_concurrent_rpcs": 3})

    async def body() -> None:
        s = _Session(cluster.decode_hosts[0].address)
        try:
            starts = [_start(f"r{i}", p, 30) for i, p in enumerate(PROMPTS[:5])]
            await s.call.write(worker_pb2.DecodeSessionRequest(start=starts))
            await s.until(lambda: all(s.finish(f"r{i}") or s.error(f"r{i}") for i in range(5)))
            assert [s.error(f"r{i}") for i in range(5)] == [None] * 3 + [
                grpc.StatusCode.RESOURCE_EXHAUSTED
            ] * 2
            assert all(s.finish(f"r{i}") == "length" for i in range(3))
            await s.call.write(
                worker_pb2.DecodeSessionRequest(start=[_start("again", PROMPTS[6], 3)])
            )
            await s.until(lambda: s.finish("again"))  # the slots came back
        finally:
            await s.close()

    cluster.run(body(), timeout_s=60)
    cluster.wait_no_leaks()
