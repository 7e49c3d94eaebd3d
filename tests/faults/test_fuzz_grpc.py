"""Fuzzed GenerateRequests get OK or a client-error status, never INTERNAL/UNKNOWN."""

from __future__ import annotations

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from disagg.v1 import scheduler_pb2

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
}
text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=300)
int32 = st.integers(-(2**31), 2**31 - 1)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def requests(draw: st.DrawFn) -> scheduler_pb2.GenerateRequest:
    req = scheduler_pb2.GenerateRequest()
    kind = draw(st.sampled_from(["prompt", "ids", "messages", "none", "both", "huge"]))
    if kind in ("prompt", "both"):
        req.prompt = draw(text)
    if kind in ("ids", "both"):
        req.prompt_token_ids.extend(draw(st.lists(int32 | st.integers(0, 600), max_size=300)))
    if kind == "messages":
        for role, content in draw(
            st.lists(st.tuples(st.sampled_from(["user", "system", "bogus", ""]), text), max_size=4)
        ):
            req.messages.add(role=role, content=content)
    if kind == "huge":
        req.prompt = "t5 " * draw(st.integers(200, 100_000))
    for name, strat in (
        ("max_tokens", int32),
        ("temperature", floats),
        ("top_p", floats),
        ("top_k", int32),
        ("seed", st.integers(-(2**63), 2**63 - 1)),
    ):
        if draw(st.booleans()):
            setattr(req, name, draw(strat))
    req.stop.extend(draw(st.lists(text, max_size=3)))
    req.ignore_eos = draw(st.booleans())
    if draw(st.integers(0, 9)) == 0:
        req.decode_worker = draw(text)
    return req


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(req=requests())
def test_fuzzed_requests_get_client_errors_only(
    tiny_cluster, req: scheduler_pb2.GenerateRequest
) -> None:  # type: ignore[no-untyped-def]
    call = tiny_cluster.stub().Generate(req, timeout=30)
    code = grpc.StatusCode.OK
    try:
        for _ in call:
            call.cancel()  # the first response proves it was served; don't run it out
            break
    except grpc.RpcError as e:
        code = e.code()
        if code == grpc.StatusCode.CANCELLED:
            code = grpc.StatusCode.OK
        else:
            assert e.details(), "an error without a message"
    assert code in ALLOWED, f"{code}: {req}"


def test_healthy_after_fuzzing(tiny_cluster) -> None:  # type: ignore[no-untyped-def]
    ids, _, last = tiny_cluster.generate(prompt_token_ids=[5, 6, 7], max_tokens=4, temperature=0)
    assert len(ids) == 4 and last.finish_reason == "length"
    tiny_cluster.wait_no_leaks(timeout_s=10)
