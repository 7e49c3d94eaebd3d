"""One request's sampling parameters never fail another's (issue 14, hole 2).

Through real gRPC against a real in-process cluster (cluster token on):

1. Eight concurrent Generate calls, one with a tiny temperature (served
   greedily: the scheduler turns a temperature below MIN_TEMPERATURE into 0)
   and one with NaN (INVALID_ARGUMENT): every served stream is greedy-equal to
   transformers' reference.
2. Out-of-range sampling (non-finite, over the bounds, top_k past int32's
   reach of the engine) is INVALID_ARGUMENT naming the field, never
   UNKNOWN/INTERNAL.
3. The workers check for themselves: bad SamplingParams sent straight to a
   prefill and a decode worker with the cluster token are INVALID_ARGUMENT;
   a tiny temperature sent straight to the decode worker among seven greedy
   requests of one batch (no scheduler to normalise it) is served greedily and
   the seven are untouched.
Leak check (pools, Redis KV keys) after each.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import redis

from disagg.engine.api import MAX_TOP_K
from disagg.engine.testing import GreedyReference, prompt_of
from disagg.metastore.embedded import EmbeddedValkey
from disagg.runtime.cluster_auth import TOKEN_METADATA
from disagg.v1 import common_pb2, scheduler_pb2, worker_pb2, worker_pb2_grpc
from tests.cluster import Cluster

TOKEN = "test-requests-sampling-token"
N_NEW = 10
TINY = 1e-30  # float32 keeps it: 1/TINY overflows every logit to inf


@pytest.fixture(scope="module")
def cluster(tiny_model: str, valkey: EmbeddedValkey) -> Iterator[Cluster]:
    with redis.Redis.from_url(valkey.url) as r:
        r.flushall()
    auth = {"cluster_token": TOKEN}
    c = Cluster(tiny_model, valkey.url, worker=auth, scheduler=auth).start()
    yield c
    c.stop()


def _together(calls: list[Callable[[], Any]]) -> list[Any]:
    """Runs the calls on threads released at once; each result, or the RpcError it raised."""
    results: list[Any] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = calls[i]()
        except grpc.RpcError as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a stream hung"
    return results


def _stream(cluster: Cluster, req: scheduler_pb2.GenerateRequest) -> tuple[list[int], str]:
    ids: list[int] = []
    finish = ""
    for resp in cluster.stub().Generate(req, timeout=60):
        ids.extend(resp.token_ids)
        finish = resp.finish_reason or finish
    return ids, finish


def test_tiny_and_nan_temperature_in_a_batch_of_8(
    cluster: Cluster, tiny_reference: GreedyReference
) -> None:
    prompts = [prompt_of(8 + 3 * i, seed=100 + i) for i in range(8)]
    temps = [0.0] * 8
    temps[2], temps[5] = TINY, math.nan
    reqs = [
        scheduler_pb2.GenerateRequest(prompt_token_ids=p, max_tokens=N_NEW, temperature=t)
        for p, t in zip(prompts, temps, strict=True)
    ]
    results = _together([lambda r=r: _stream(cluster, r) for r in reqs])  # type: ignore[misc]
    nan = results[5]
    assert isinstance(nan, grpc.RpcError), nan
    assert nan.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in nan.details()
    for i, res in enumerate(results):
        if i == 5:
            continue
        assert not isinstance(res, grpc.RpcError), f"request {i}: {res}"
        ids, finish = res
        assert finish in ("stop", "length"), f"request {i} finished {finish!r}"
        assert ids == tiny_reference(prompts[i], N_NEW), f"request {i} (temperature {temps[i]})"
    cluster.wait_no_leaks(timeout_s=10)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": -math.inf}, "temperature"),
        ({"temperature": -TINY}, "temperature"),
        ({"temperature": 100.5}, "temperature"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_k": 2**31 - 1}, "top_k"),  # was UNKNOWN: a ValueError turning it into the wire
        ({"top_k": MAX_TOP_K + 1}, "top_k"),
        ({"top_k": -1}, "top_k"),
    ],
)
def test_out_of_range_sampling_is_invalid_argument(
    cluster: Cluster, fields: dict[str, Any], field: str
) -> None:
    req = scheduler_pb2.GenerateRequest(prompt_token_ids=[5, 6, 7], max_tokens=2, **fields)
    with pytest.raises(grpc.RpcError) as err:
        _stream(cluster, req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert field in (err.value.details() or "")


@pytest.fixture(scope="module")
def workers(
    cluster: Cluster,
) -> Iterator[tuple[worker_pb2_grpc.PrefillWorkerStub, worker_pb2_grpc.DecodeWorkerStub]]:
    """Stubs of the prefill and the decode worker, called directly (no scheduler)."""
    pre, dec = cluster.prefill_hosts[0].address, cluster.decode_hosts[0].address
    assert pre and dec
    with grpc.insecure_channel(pre) as ch_pre, grpc.insecure_channel(dec) as ch_dec:
        yield worker_pb2_grpc.PrefillWorkerStub(ch_pre), worker_pb2_grpc.DecodeWorkerStub(ch_dec)


AUTH = ((TOKEN_METADATA, TOKEN),)


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"top_p": math.nan},
        {"top_k": MAX_TOP_K + 1},
        {"max_tokens": 0},
    ],
)
def test_workers_refuse_bad_sampling_themselves(
    cluster: Cluster, workers: Any, bad: dict[str, Any]
) -> None:
    sampling = common_pb2.SamplingParams(**{"max_tokens": 2, **bad})
    field = next(iter(bad))
    prefill, decode = workers
    with pytest.raises(grpc.RpcError) as err:
        prefill.Prefill(
            worker_pb2.PrefillRequest(
                request_id="direct-bad-1", prompt_token_ids=[5, 6, 7], sampling=sampling
            ),
            metadata=AUTH,
            timeout=30,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        for _ in decode.Decode(
            worker_pb2.DecodeRequest(
                request_id="direct-bad-2", prompt_token_ids=[5, 6, 7], sampling=sampling
            ),
            metadata=AUTH,
            timeout=30,
        ):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    cluster.wait_no_leaks()


def test_tiny_temperature_straight_to_the_decode_worker_is_greedy_and_alone(
    cluster: Cluster, workers: Any, tiny_reference: GreedyReference
) -> None:
    """No scheduler in front: the engine's sampler gets temperature 1e-40 (a float32
    denormal) in the same batch as seven greedy requests."""
    _, decode = workers
    prompts = [prompt_of(6 + 2 * i, seed=200 + i) for i in range(8)]
    temps = [0.0] * 8
    temps[4] = 1e-40
    assert common_pb2.SamplingParams(temperature=1e-40).temperature > 0  # not flushed to 0

    def run(i: int) -> tuple[list[int], str]:
        sampling = common_pb2.SamplingParams(max_tokens=N_NEW, temperature=temps[i])
        req = worker_pb2.DecodeRequest(
            request_id=f"direct-tiny-{i}", prompt_token_ids=prompts[i], sampling=sampling
        )
        ids: list[int] = []
        finish = ""
        for resp in decode.Decode(req, metadata=AUTH, timeout=60):
            ids.extend(resp.token_ids)
            finish = resp.finish_reason or finish
        return ids, finish

    results = _together([lambda i=i: run(i) for i in range(8)])  # type: ignore[misc]
    for i, res in enumerate(results):
        assert not isinstance(res, grpc.RpcError), f"request {i}: {res}"
        ids, finish = res
        assert finish in ("stop", "length"), f"request {i} finished {finish!r}"
        assert ids == tiny_reference(prompts[i], N_NEW), f"request {i} (temperature {temps[i]})"
    cluster.wait_no_leaks(timeout_s=10)
