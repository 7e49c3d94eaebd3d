"""Layer-wise KV streaming between real workers, over each transport.

``PrefillStream`` hands out a PREFILLING handle before the prompt runs; a decode
worker given it follows the KV with ``WatchKv`` while the prefill computes it
(NIXL: READs of each layer's completed blocks as they land; gRPC: one pull at
the owner's done). Every scenario ends greedy-equal to transformers' generate,
with 0 blocks leaked on either side and no KV key left in Redis.

The prefill worker's steps are slowed (its engine's forward sleeps), so the
decode worker is following before the prompt is done; the tiny model's steps
are 16 tokens (``max_num_batched_tokens``), so a prompt takes several chunks.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import grpc
import pytest

from disagg.engine.testing import GreedyReference, prompt_of
from disagg.v1 import common_pb2, scheduler_pb2, worker_pb2, worker_pb2_grpc

N_NEW = 10
STEP_DELAY_S = 0.03


@pytest.fixture(params=["nixl", "grpc"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _slow_prefill(host: Any) -> None:
    runner = host.engine.runner
    run = runner.run

    def slow(*args: Any, **kw: Any) -> Any:
        time.sleep(STEP_DELAY_S)
        return run(*args, **kw)

    runner.run = slow


def _cluster(make_cluster: Any, transport: str) -> Any:
    cluster = make_cluster(
        engine={"max_num_batched_tokens": 16}, worker={"kv_transport": transport}
    )
    _slow_prefill(cluster.prefill_hosts[0])
    return cluster


def _sampling() -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(max_tokens=N_NEW)


class _Decode(threading.Thread):
    """One Decode call in the background: every token it streams, its first response."""

    def __init__(self, address: str, rid: str, prompt: list[int], handle: Any):
        super().__init__(daemon=True)
        self._channel = grpc.insecure_channel(address)
        req = worker_pb2.DecodeRequest(
            request_id=rid, prompt_token_ids=prompt, sampling=_sampling(), handle=handle
        )
        self.call = worker_pb2_grpc.DecodeWorkerStub(self._channel).Decode(req, timeout=60)
        self.responses: list[worker_pb2.DecodeResponse] = []
        self.error: grpc.RpcError | None = None
        self.start()

    def run(self) -> None:
        try:
            self.responses.extend(self.call)
        except grpc.RpcError as e:
            self.error = e
        finally:
            self._channel.close()

    @property
    def tokens(self) -> list[int]:
        return [t for r in self.responses for t in r.token_ids]


def _stream(address: str, rid: str, prompt: list[int]) -> tuple[Any, Any, grpc.Channel]:
    """(the PrefillResponses, the call, its channel) of one PrefillStream."""
    ch = grpc.insecure_channel(address)
    req = worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=prompt, sampling=_sampling())
    calls = worker_pb2_grpc.PrefillWorkerStub(ch).PrefillStream(
        worker_pb2.PrefillStreamRequest(prefill=req), timeout=60
    )
    return (r.prefill for r in calls), calls, ch


def test_streamed_handoff_is_greedy_equal_and_reads_before_the_prefill_ends(
    make_cluster: Any, tiny_reference: GreedyReference, transport: str
) -> None:
    cluster = _cluster(make_cluster, transport)
    prefill, decode = cluster.prefill_hosts[0], cluster.decode_hosts[0]
    prompt = prompt_of(150, 3)  # 10 chunks, the last block partial
    want = tiny_reference(prompt, N_NEW)
    assert len(set(want)) >= 4, "reference output not diverse"
    reads: list[bool] = []  # per NIXL READ: was the prefill done (its KV held) by then?
    if transport == "nixl":
        agent = decode.kv.agent
        read_layers = agent.read_layers

        async def recording(remote: str, parts: Any) -> int:
            reads.append(prefill.engine.held_blocks("ls-1") is not None)
            return await read_layers(remote, parts)

        agent.read_layers = recording

    calls, _, ch = _stream(prefill.address, "ls-1", prompt)
    first = next(calls)
    assert first.handle.state == common_pb2.KV_STATE_PREFILLING and not first.handle.block_ids
    dec = _Decode(decode.address, "ls-1", prompt, first.handle)
    last = next(calls)
    ch.close()
    dec.join(60)
    assert dec.error is None, dec.error
    assert last.handle.state == common_pb2.KV_STATE_READY and last.prefill_ms > 0
    assert dec.tokens == want and want[0] == last.handle.first_token_id
    assert dec.responses[0].kv_transport == transport and dec.responses[0].prefill_ms == 0
    assert decode.kv.metrics.totals() == {transport: (1, 0)}
    if transport == "nixl":
        assert len(reads) > 2 and not reads[0], f"no READ before the prefill ended: {reads}"
    cluster.wait_no_leaks()


def test_a_prefill_cancelled_mid_stream_falls_back_on_the_decode_worker(
    make_cluster: Any, tiny_reference: GreedyReference, transport: str
) -> None:
    cluster = _cluster(make_cluster, transport)
    prefill, decode = cluster.prefill_hosts[0], cluster.decode_hosts[0]
    prompt = prompt_of(150, 4)
    want = tiny_reference(prompt, N_NEW)
    calls, call, ch = _stream(prefill.address, "ls-2", prompt)
    first = next(calls)
    dec = _Decode(decode.address, "ls-2", prompt, first.handle)
    time.sleep(4 * STEP_DELAY_S)  # a few chunks in
    call.cancel()
    ch.close()
    dec.join(60)
    assert dec.error is None, dec.error
    assert dec.tokens == want  # the engine here sampled the first token too
    assert dec.responses[0].kv_transport == "fallback" and dec.responses[0].prefill_ms > 0
    assert decode.kv.metrics.totals() == {transport: (1, 1)}
    cluster.wait_no_leaks()


def test_one_reader_per_stream_and_a_reader_that_leaves_gives_the_kv_up(
    make_cluster: Any,
) -> None:
    cluster = _cluster(make_cluster, "grpc")
    prefill = cluster.prefill_hosts[0]
    prompt = prompt_of(150, 5)
    with grpc.insecure_channel(prefill.address) as ch:
        stub = worker_pb2_grpc.PrefillWorkerStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            next(stub.WatchKv(worker_pb2.WatchKvRequest(request_id="nobody"), timeout=5))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        calls, _, pch = _stream(prefill.address, "ls-3", prompt)
        next(calls)
        watch = stub.WatchKv(worker_pb2.WatchKvRequest(request_id="ls-3"), timeout=30)
        p = next(watch)
        assert not p.done and p.upto <= len(prompt)
        with pytest.raises(grpc.RpcError) as e:
            next(stub.WatchKv(worker_pb2.WatchKvRequest(request_id="ls-3"), timeout=5))
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        seen = [p]
        while seen[-1].upto < 64:  # progress grows chunk by chunk, layer by layer
            seen.append(next(watch))
        assert all(a.upto <= b.upto for a, b in itertools.pairwise(seen))
        watch.cancel()  # the reader leaves before done: the KV is given up
        last = next(calls)
        pch.close()
        assert last.handle.state == common_pb2.KV_STATE_READY
    cluster.wait_no_leaks()  # freed at once, not by the lease
    assert cluster.run(_freed(prefill))["failed"] == 1


async def _freed(host: Any) -> dict[str, int]:
    return dict(host.servicer.freed)


def test_the_scheduler_streams_long_prompts_and_cancels_cleanly(
    make_cluster: Any, tiny_reference: GreedyReference, transport: str
) -> None:
    cluster = make_cluster(
        engine={"max_num_batched_tokens": 16},
        worker={"kv_transport": transport},
        scheduler={"kv_stream_tokens": 100},
    )
    prefill = cluster.prefill_hosts[0]
    _slow_prefill(prefill)
    sender = prefill.servicer._sender
    open_stream = sender.open_stream
    streamed: list[str] = []

    def recording(rid: str) -> Any:
        streamed.append(rid)
        return open_stream(rid)

    sender.open_stream = recording
    long, short = prompt_of(150, 6), prompt_of(40, 7)
    for prompt in (long, short):
        want = tiny_reference(prompt, N_NEW)
        ids, _, last = cluster.generate(prompt_token_ids=prompt, max_tokens=N_NEW, temperature=0)
        assert ids == want
        assert last.timings.kv_transport == transport and last.prefill_worker and last.decode_worker
        assert last.usage.completion_tokens == N_NEW and last.timings.prefill_ms > 0
    assert len(streamed) == 1, "only the long prompt streams"
    assert last.timings.ttft_ms > 0

    # A client gone while the prefill still runs: nothing left anywhere.
    call = cluster.stub().Generate(
        scheduler_pb2.GenerateRequest(prompt_token_ids=prompt_of(150, 8), max_tokens=N_NEW)
    )
    time.sleep(5 * STEP_DELAY_S)
    call.cancel()
    assert len(streamed) == 2
    cluster.wait_no_leaks(timeout_s=10)
