"""Fuzzed GenerateRequests get OK or a client-error status, never INTERNAL/UNKNOWN.

Every stream is read to its end: an OK stream must end "stop" or "length". A
request that passed validation is valid input, so a stream ending "error" (an
engine failure reported in-band) is a failure of the server, not of the input.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from disagg.metastore.embedded import EmbeddedValkey
from disagg.v1 import scheduler_pb2
from tests.cluster import Cluster

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,
}
text = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=300)
int32 = st.integers(-(2**31), 2**31 - 1)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
small = st.integers(1, 24)  # valid max_tokens often, so streams are served (and stay short)


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
        ("max_tokens", int32 | small),
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


@pytest.fixture(scope="module")
def fuzz_cluster(tiny_model: str, valkey: EmbeddedValkey) -> Iterator[Cluster]:
    """The tiny cluster with a short default max_tokens: every stream is read out."""
    with redis.Redis.from_url(valkey.url) as r:
        r.flushall()
    cluster = Cluster(tiny_model, valkey.url, scheduler={"default_max_tokens": 16}).start()
    yield cluster
    cluster.stop()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(req=requests())
def test_fuzzed_requests_get_client_errors_only(
    fuzz_cluster: Cluster, req: scheduler_pb2.GenerateRequest
) -> None:
    code = grpc.StatusCode.OK
    finish = ""
    try:
        for resp in fuzz_cluster.stub().Generate(req, timeout=30):
            assert not finish, f"a response after the last one: {req}"
            finish = resp.finish_reason
    except grpc.RpcError as e:
        code = e.code()
        assert e.details(), "an error without a message"
    assert code in ALLOWED, f"{code}: {req}"
    if code == grpc.StatusCode.OK:
        assert finish in ("stop", "length"), f"stream ended {finish!r}: {req}"


def test_healthy_after_fuzzing(fuzz_cluster: Cluster) -> None:
    ids, _, last = fuzz_cluster.generate(prompt_token_ids=[5, 6, 7], max_tokens=4, temperature=0)
    assert len(ids) == 4 and last.finish_reason == "length"
    fuzz_cluster.wait_no_leaks(timeout_s=10)
