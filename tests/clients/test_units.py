"""The pure parts of the client and of the verifier: retry waits, hints, requests, events."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from disagg.client.errors import ClientError, ResourceExhausted, make_error, retry_hint
from disagg.client.paths import PathComparison, read_prompts
from disagg.client.request import build_request
from disagg.client.retry import RetryPolicy
from disagg.client.types import Collector, GenerateEvent, Timings, Usage
from disagg.engine.api import SamplingParams
from disagg.metrics.scheduler import SchedulerMetrics
from disagg.policy.routing import RouteRequest, Snapshot, WorkerView, decide
from services.scheduler.requests import (
    GenerationRequest,
    InvalidRequest,
    RawRequest,
)
from services.scheduler.requests import (
    build_request as build_raw,
)
from services.scheduler.verify import Verifier, VerifyJob, first_difference

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_hint_is_waited_never_shortened() -> None:
    p = RetryPolicy(jitter=0.2)
    err = make_error(EXHAUSTED, "busy", retry_after_s=1.5)
    assert p.next_wait(1, err, None, rand=lambda: 0.0) == 1.5
    assert p.next_wait(1, err, None, rand=lambda: 0.999) == pytest.approx(1.5 * 1.2, rel=1e-3)
    assert p.next_wait(1, err, time_left_s=1.0) is None  # would outlive the deadline
    assert p.next_wait(4, err, None) is None  # max_attempts tries made
    assert (
        p.next_wait(1, make_error(EXHAUSTED, "x", retry_after_s=60.0), None) is None
    )  # > max_hint_s
    assert p.next_wait(1, make_error(grpc.StatusCode.INVALID_ARGUMENT, "bad"), None) is None
    too_big = make_error(EXHAUSTED, "Received message larger than max (8388621 vs. 1048576)")
    assert p.next_wait(1, too_big, None) is None  # the same message fails the same way again
    assert p.next_wait(1, make_error(EXHAUSTED, "busy"), None, rand=lambda: 0.5) is not None


def test_backoff_without_a_hint_grows_and_is_jittered() -> None:
    p = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.3, multiplier=2.0, jitter=0.2)
    err = make_error(grpc.StatusCode.UNAVAILABLE, "down")
    mid = [p.next_wait(n, err, None, rand=lambda: 0.5) for n in (1, 2, 3)]
    assert mid == pytest.approx([0.1, 0.2, 0.3])  # capped at max_backoff_s
    assert p.next_wait(1, err, None, rand=lambda: 0.0) == pytest.approx(0.08)
    assert p.next_wait(1, err, None, rand=lambda: 1.0) == pytest.approx(0.12)
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_retry_hint_is_read_from_metadata_then_the_message() -> None:
    assert retry_hint((("retry-after", "2.5"),), (), "") == 2.5
    assert retry_hint((), (("retry-after", "0.3"),), "") == 0.3
    assert retry_hint((), (), "3 requests in flight (limit 2); retry after 1s") == 1.0
    assert retry_hint((("retry-after", "soon"),), (), "") is None
    assert retry_hint(None, None, "no hint here") is None
    err = make_error(EXHAUSTED, "x", 1.0)
    assert isinstance(err, ResourceExhausted) and isinstance(err, ClientError)
    assert type(make_error(grpc.StatusCode.INTERNAL, "x")) is ClientError


def test_build_request_leaves_unset_options_unset() -> None:
    req = build_request(
        None,
        {
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "temperature": 0.0,
            "seed": None,
            "stop": ["\n"],
            "verify": True,
        },
    )
    assert not req.prompt and req.messages[0].content == "hi" and list(req.stop) == ["\n"]
    assert req.HasField("max_tokens") and req.HasField("temperature") and req.temperature == 0
    assert not req.HasField("seed") and not req.HasField("top_p") and req.verify
    with pytest.raises(TypeError, match="tokens"):
        build_request("x", {"tokens": 3})


def test_collector_folds_a_stream() -> None:
    c = Collector()
    c.add(GenerateEvent("r", (5,), "a"))
    c.add(GenerateEvent("r", (6, 7), "bc"))
    with pytest.raises(ClientError, match="final"):
        c.result()
    c.add(GenerateEvent("r", (), "", "length", Usage(3, 3, 0), Timings(e2e_ms=1.0), "p", "d"))
    done = c.result()
    assert done.token_ids == (5, 6, 7) and done.text == "abc" and done.finish_reason == "length"
    assert done.usage.completion_tokens == 3 and done.prefill_worker == "p"


def test_prompts_file_and_comparisons(tmp_path: Path) -> None:
    f = tmp_path / "prompts.txt"
    f.write_text(
        "# comment\nOnce upon a time\n\n"
        + json.dumps({"prompt_token_ids": [5, 6, 7]})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}]})
        + "\n"
    )
    ps = read_prompts(str(f))
    assert [p.prompt for p in ps] == ["Once upon a time", "", ""]
    assert ps[1].prompt_token_ids == (5, 6, 7) and ps[2].messages[0]["content"] == "hi"
    f.write_text('{"messages": [{"role": "user"}]}\n')
    with pytest.raises(ValueError, match=r"prompts\.txt:1"):
        read_prompts(str(f))
    same = PathComparison(0, "p", "d", (1, 2), (1, 2))
    assert same.match and same.first_difference is None
    assert PathComparison(0, "p", "d", (1, 2), (1, 3)).first_difference == 1
    assert not PathComparison(0, "p", "d", (1, 2), (1, 2), problem="not pinned").match
    assert first_difference((1, 2, 3), (1, 2)) == 2


def _view(worker_id: str, role: str) -> WorkerView:
    return WorkerView(worker_id, worker_id + ":1", role, 100, 100, 16, 0, 0)


def test_prefill_pinned_to_the_decode_worker_is_collocated() -> None:
    snap = Snapshot([_view("p", "prefill"), _view("d", "decode")])
    local = decide(snap, RouteRequest(40, 8, prefill_pin="d", decode_pin="d"))
    assert local.prefill is None and local.decode.worker_id == "d"
    assert decide(snap, RouteRequest(40, 8, prefill_pin="d:1", decode_pin="d")).prefill is None
    remote = decide(snap, RouteRequest(40, 8, prefill_pin="p", decode_pin="d"))
    assert remote.prefill is not None and remote.prefill.worker_id == "p"


def test_verify_needs_greedy() -> None:
    raw = RawRequest(prompt_token_ids=[5, 6], max_tokens=2, verify=True)
    with pytest.raises(InvalidRequest, match="verify"):
        build_raw(raw, None, 512, 256, 16)  # temperature unset = 1.0
    ok = build_raw(
        RawRequest(prompt_token_ids=[5, 6], temperature=0.0, verify=True), None, 512, 256, 16
    )
    assert ok.verify


def _request(temperature: float, verify: bool = False) -> GenerationRequest:
    return GenerationRequest("r", [5, 6], SamplingParams(4, temperature), verify=verify)


def test_verifier_samples_greedy_requests_and_drops_when_full() -> None:
    metrics = SchedulerMetrics()
    draws = iter([0.01, 0.5])
    v = Verifier(None, list, metrics, fraction=0.1, max_pending=1, rand=lambda: next(draws))  # type: ignore[arg-type]
    assert v.wants(_request(0.0)) and not v.wants(_request(0.0))  # 0.01 < 0.1, 0.5 is not
    assert not v.wants(_request(0.7, verify=True))  # sampled output is not comparable
    assert Verifier(None, list, metrics).wants(_request(0.0, verify=True))  # type: ignore[arg-type]

    async def fill() -> None:
        v.submit(VerifyJob(_request(0.0), (1,), "d", "p"))  # runs: no decode worker -> error
        v.submit(VerifyJob(_request(0.0), (1,), "d", "p"))  # queue full? (max_pending 1)
        await v.settle()
        await v.close()

    asyncio.run(fill())
    errors = metrics.registry.get_sample_value("disagg:verify_skipped_total", {"reason": "error"})
    full = metrics.registry.get_sample_value(
        "disagg:verify_skipped_total", {"reason": "queue_full"}
    )
    assert (errors or 0) + (full or 0) == 2 and errors
    assert metrics.registry.get_sample_value("disagg:verify_total", {"result": "match"}) == 0
