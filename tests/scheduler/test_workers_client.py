"""WorkerClient: protobuf <-> dataclasses, and gRPC errors as the orchestrator's exceptions.

The conversions are pure; the error mapping runs against a real ``grpc.aio``
server on 127.0.0.1 port 0 whose servicers answer canned messages or abort.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import pytest

from disagg.engine.api import SamplingParams
from disagg.metrics.scheduler import SchedulerMetrics, kv_bytes
from disagg.policy.routing import WorkerView
from disagg.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from services.scheduler.requests import GenerationRequest, InvalidRequest
from services.scheduler.workers import (
    DecodeLost,
    DecodeUpdate,
    KvTicket,
    PrefillUnreachable,
    WorkerClient,
    decode_request,
    decode_update,
    prefill_request,
    prefill_result,
    release_request,
)
from tests.control.helpers import run_async
from tests.ports import free_port as _free_port
from tests.scheduler import factories

LAYOUT = common_pb2.KvLayout(
    num_layers=2, num_kv_heads=4, head_dim=8, dtype="bfloat16", block_size=16
)


def _request(**kw: object) -> GenerationRequest:
    fields: dict = {
        "request_id": "r-1",
        "prompt_token_ids": [5, 6, 7],
        "sampling": SamplingParams(max_tokens=9, temperature=0.5, top_k=3, seed=11),
        **kw,
    }
    return GenerationRequest(**fields)


def _handle(address: str = "127.0.0.1:1", blocks: int = 3) -> common_pb2.KvHandle:
    return common_pb2.KvHandle(
        request_id="r-1",
        owner_worker_id="prefill-0",
        owner_address=address,
        block_ids=list(range(blocks)),
        num_tokens=40,
        layout=LAYOUT,
        first_token_id=42,
    )


def _ticket(address: str = "127.0.0.1:1") -> KvTicket:
    return prefill_result(worker_pb2.PrefillResponse(handle=_handle(address))).handle


# --- pure conversions --------------------------------------------------------------------


def test_prefill_request_carries_the_prompt_and_sampling() -> None:
    msg = prefill_request(_request())
    assert msg.request_id == "r-1" and list(msg.prompt_token_ids) == [5, 6, 7]
    s = msg.sampling
    assert (s.max_tokens, s.top_k, s.seed) == (9, 3, 11)
    assert s.temperature == pytest.approx(0.5)
    unseeded = prefill_request(_request(sampling=SamplingParams(max_tokens=2)))
    assert not unseeded.sampling.HasField("seed")


def test_prefill_result_wraps_the_handle_in_an_opaque_ticket() -> None:
    resp = worker_pb2.PrefillResponse(
        handle=_handle(), queue_ms=1.5, prefill_ms=7.25, cached_tokens=16
    )
    res = prefill_result(resp)
    assert (res.first_token_id, res.cached_tokens) == (42, 16)
    assert (res.queue_ms, res.prefill_ms) == (1.5, 7.25)
    assert res.handle.nbytes == kv_bytes(3, 2, 16, 4, 8, "bfloat16") == 3 * 2 * 2 * 16 * 4 * 8 * 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.cached_tokens = 0  # type: ignore[misc]


def test_decode_request_with_a_ticket_pulls_without_one_prefills() -> None:
    ticket = _ticket()
    handed = decode_request(_request(), ticket)
    assert handed.HasField("handle") and handed.handle == _handle()
    assert list(handed.prompt_token_ids) == [5, 6, 7] and handed.sampling.max_tokens == 9
    local = decode_request(_request(), None)
    assert not local.HasField("handle") and list(local.prompt_token_ids) == [5, 6, 7]


def test_decode_update_unset_fields_are_none_or_zero() -> None:
    first = decode_update(worker_pb2.DecodeResponse(token_ids=[1, 2], kv_transfer_ms=3.0))
    assert first == DecodeUpdate(token_ids=(1, 2), kv_transfer_ms=3.0)
    assert first.finish_reason is None
    last = decode_update(worker_pb2.DecodeResponse(finish_reason="length", decode_ms=9.5))
    assert last == DecodeUpdate(token_ids=(), finish_reason="length", decode_ms=9.5)


def test_release_request_frees_unconsumed_kv() -> None:
    msg = release_request(_ticket())
    assert msg.request_id == "r-1" and not msg.consumed


def test_handed_off_bytes_are_counted() -> None:
    metrics = SchedulerMetrics()
    metrics.kv_handed_off(_ticket().nbytes)
    got = metrics.registry.get_sample_value("disagg:kv_transfer_bytes_total")
    assert got == kv_bytes(3, 2, 16, 4, 8, "bfloat16")


# --- error mapping against a real server -------------------------------------------------


@dataclass
class _Prefill(worker_pb2_grpc.PrefillWorkerServicer):
    abort: grpc.StatusCode | None = None
    delay_s: float = 0.0
    released: list[worker_pb2.ReleaseKvRequest] = field(default_factory=list)

    async def Prefill(self, request, context):  # type: ignore[no-untyped-def]
        await asyncio.sleep(self.delay_s)
        if self.abort is not None:
            await context.abort(self.abort, "canned failure")
        return worker_pb2.PrefillResponse(handle=_handle(), prefill_ms=2.0, cached_tokens=0)

    async def ReleaseKv(self, request, context):  # type: ignore[no-untyped-def]
        self.released.append(request)
        if self.abort is not None:
            await context.abort(self.abort, "canned failure")
        return worker_pb2.ReleaseKvResponse(released=True)


@dataclass
class _Decode(worker_pb2_grpc.DecodeWorkerServicer):
    responses: list[worker_pb2.DecodeResponse] = field(default_factory=list)
    abort: grpc.StatusCode | None = None  # after the responses
    forever: bool = False  # keep the stream open after the responses
    requests: list[worker_pb2.DecodeRequest] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    async def Decode(self, request, context):  # type: ignore[no-untyped-def]
        self.requests.append(request)
        for resp in self.responses:
            yield resp
        try:
            while self.forever:
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        if self.abort is not None:
            await context.abort(self.abort, "canned failure")


async def _with_server(
    prefill: _Prefill,
    decode: _Decode,
    body: Callable[[WorkerClient, WorkerView, WorkerView], Awaitable[None]],
    timeout_s: float = 5.0,
) -> None:
    server = grpc.aio.server()
    worker_pb2_grpc.add_PrefillWorkerServicer_to_server(prefill, server)
    worker_pb2_grpc.add_DecodeWorkerServicer_to_server(decode, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channels: dict[str, grpc.aio.Channel] = {}

    def channel_for(address: str) -> grpc.aio.Channel:
        return channels.setdefault(address, grpc.aio.insecure_channel(address))

    addr = f"127.0.0.1:{port}"
    pre = dataclasses.replace(factories.prefill("prefill-0"), address=addr)
    dec = dataclasses.replace(factories.decode("decode-0"), address=addr)
    try:
        await body(WorkerClient(channel_for, timeout_s), pre, dec)
    finally:
        for ch in channels.values():
            await ch.close()
        await server.stop(None)


async def _collect(updates: AsyncIterator[DecodeUpdate], into: list[DecodeUpdate]) -> None:
    async for up in updates:
        into.append(up)


def test_prefill_answer_becomes_a_result() -> None:
    async def body(client: WorkerClient, pre: WorkerView, dec: WorkerView) -> None:
        res = await client.prefill(pre, _request())
        assert res.first_token_id == 42 and res.prefill_ms == 2.0

    run_async(_with_server(_Prefill(), _Decode(), body))


def test_prefill_invalid_argument_is_an_invalid_request() -> None:
    async def body(client: WorkerClient, pre: WorkerView, dec: WorkerView) -> None:
        with pytest.raises(InvalidRequest, match="prompt: canned failure") as e:
            await client.prefill(pre, _request())
        assert e.value.field == "prompt"

    run_async(_with_server(_Prefill(abort=grpc.StatusCode.INVALID_ARGUMENT), _Decode(), body))


@pytest.mark.parametrize(
    ("servicer", "code"),
    [
        (_Prefill(abort=grpc.StatusCode.UNAVAILABLE), "UNAVAILABLE"),
        (_Prefill(abort=grpc.StatusCode.INTERNAL), "INTERNAL"),
        (_Prefill(delay_s=2.0), "DEADLINE_EXCEEDED"),
    ],
)
def test_prefill_failures_are_unreachable(servicer: _Prefill, code: str) -> None:
    async def body(client: WorkerClient, pre: WorkerView, dec: WorkerView) -> None:
        with pytest.raises(PrefillUnreachable) as e:
            await client.prefill(pre, _request())
        assert e.value.code == code and str(e.value).startswith(code + " ")

    run_async(_with_server(servicer, _Decode(), body, timeout_s=0.3))


def test_prefill_on_a_closed_port_is_unreachable() -> None:
    async def body(client: WorkerClient, pre: WorkerView, dec: WorkerView) -> None:
        gone = dataclasses.replace(pre, address=f"127.0.0.1:{_free_port()}")
        with pytest.raises(PrefillUnreachable) as e:
            await client.prefill(gone, _request())
        assert e.value.code == "UNAVAILABLE"

    run_async(_with_server(_Prefill(), _Decode(), body))


def test_decode_streams_updates_and_sends_the_ticket() -> None:
    decode = _Decode(
        responses=[
            worker_pb2.DecodeResponse(token_ids=[1], kv_transfer_ms=4.0),
            worker_pb2.DecodeResponse(token_ids=[2, 3], finish_reason="stop", decode_ms=6.0),
        ]
    )

    async def body(client: WorkerClient, pre: WorkerView, dec: WorkerView) -> None:
        got: list[DecodeUpdate] = []
        await _collect(client.decode(dec, _request(), _ticket()), got)
        assert got == [
            DecodeUpdate(token_ids=(1,), kv_transfer_ms=4.0),
            DecodeUpdate(token_ids=(2, 3), finish_reason="stop", decode_ms=6.0),
        ]
        assert decode.requests[0].handle == _handle()

    run_async(_with_server(_Prefill(), decode, body))


def test_decode_broken_mid_stream_is_lost_after_the_updates_it_sent() -> None:
    decode = _Decode(
        responses=[worker_pb2.DecodeResponse(token_ids=[1])], abort=grpc.StatusCode.UNAVAILABLE
    )

    async def body(client: WorkerClient, pre: WorkerView, dec: WorkerView) -> None:
        got: list[DecodeUpdate] = []
        with pytest.raises(DecodeLost, match=r"^decode-0: UNAVAILABLE canned failure$"):
            await _collect(client.decode(dec, _request(), None), got)
        assert got == [DecodeUpdate(token_ids=(1,))]

    run_async(_with_server(_Prefill(), decode, body))


def test_decode_invalid_argument_is_an_invalid_request() -> None:
    async def body(client: WorkerClient, pre: WorkerView, dec: WorkerView) -> None:
        with pytest.raises(InvalidRequest, match="prompt: canned failure"):
            await _collect(client.decode(dec, _request(), None), [])

    run_async(_with_server(_Prefill(), _Decode(abort=grpc.StatusCode.INVALID_ARGUMENT), body))


def test_decode_worker_unreachable_is_lost() -> None:
    async def body(client: WorkerClient, pre: WorkerView, dec: WorkerView) -> None:
        gone = dataclasses.replace(dec, address=f"127.0.0.1:{_free_port()}")
        with pytest.raises(DecodeLost, match=r"^decode-0: UNAVAILABLE"):
            await _collect(client.decode(gone, _request(), None), [])

    run_async(_with_server(_Prefill(), _Decode(), body))


def test_closing_the_decode_stream_cancels_the_call() -> None:
    decode = _Decode(responses=[worker_pb2.DecodeResponse(token_ids=[1])], forever=True)

    async def body(client: WorkerClient, pre: WorkerView, dec: WorkerView) -> None:
        updates = client.decode(dec, _request(), None)
        assert (await anext(updates)).token_ids == (1,)
        await updates.aclose()
        await asyncio.wait_for(decode.cancelled.wait(), 5.0)

    run_async(_with_server(_Prefill(), decode, body))


def test_release_frees_and_never_raises() -> None:
    prefill = _Prefill()

    async def body(client: WorkerClient, pre: WorkerView, dec: WorkerView) -> None:
        await client.release(_ticket(pre.address))
        assert [(r.request_id, r.consumed) for r in prefill.released] == [("r-1", False)]
        prefill.abort = grpc.StatusCode.INTERNAL
        await client.release(_ticket(pre.address))  # a worker error: swallowed
        await client.release(_ticket(f"127.0.0.1:{_free_port()}"))  # unreachable: swallowed
        assert len(prefill.released) == 2

    run_async(_with_server(prefill, _Decode(), body))


@dataclass
class _SessionPrefill(_Prefill):
    """A prefill worker with PrefillSession: answers every start, records each message."""

    messages: list[worker_pb2.PrefillSessionRequest] = field(default_factory=list)

    async def PrefillSession(self, request_iterator, context):  # type: ignore[no-untyped-def]
        async for msg in request_iterator:
            self.messages.append(msg)
            updates = [
                worker_pb2.PrefillSessionUpdate(
                    request_id=s.request_id, response=worker_pb2.PrefillResponse(handle=_handle())
                )
                for s in msg.start
            ]
            if updates:
                yield worker_pb2.PrefillSessionResponse(updates=updates)


def test_starts_that_piled_up_go_in_messages_under_the_token_budget(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Long prompts queued during one write are split over several session messages
    (each far under the message size limit), every one answered."""
    monkeypatch.setattr("services.scheduler.workers.BATCH_PROMPT_TOKENS", 100)
    prefill = _SessionPrefill()

    async def body(client: WorkerClient, pre: WorkerView, dec: WorkerView) -> None:
        reqs = [_request(request_id=f"r-{i}", prompt_token_ids=[5] * 40) for i in range(5)]
        results = await asyncio.gather(*(client.prefill(pre, r) for r in reqs))
        assert all(r.first_token_id == 42 for r in results)
        sizes = [[len(s.prompt_token_ids) for s in m.start] for m in prefill.messages]
        assert sorted(s.request_id for m in prefill.messages for s in m.start) == [
            f"r-{i}" for i in range(5)
        ]
        assert len(sizes) > 1 and all(sum(s) <= 100 or len(s) == 1 for s in sizes), sizes
        assert client.sessions_opened == 1 and not prefill.released  # sessions, no calls

    run_async(_with_server(prefill, _Decode(), body))
