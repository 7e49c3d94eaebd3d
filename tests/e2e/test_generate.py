"""End to end through the scheduler: greedy equivalence, concurrency, KV lifecycle.

The handoff tests run once per KV transport (``cluster``: NIXL READs, gRPC chunks)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from disagg.engine.testing import TINY_MAX_CONTEXT, TINY_VOCAB
from disagg.metastore.embedded import EmbeddedValkey
from disagg.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.cluster import Cluster
from tests.faults.conftest import flush

BLOCK = 16  # EngineConfig's default block_size


@pytest.fixture(scope="module", params=["nixl", "grpc"])
def cluster(
    request: pytest.FixtureRequest, tiny_model: str, valkey: EmbeddedValkey
) -> Iterator[Cluster]:
    """A cluster whose workers move KV over one transport (``kv_transport``)."""
    flush(valkey.url)
    c = Cluster(tiny_model, valkey.url, worker={"kv_transport": request.param}).start()
    yield c
    c.stop()


def _transport_of(cluster: Cluster) -> str:
    return cluster.decode_hosts[0].cfg.kv_transport


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, TINY_VOCAB) for _ in range(n)]


def _prefill_request(rid: str, prompt: list[int], max_tokens: int = 4) -> worker_pb2.PrefillRequest:
    return worker_pb2.PrefillRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens),
    )


# (prompt length, new tokens): 1 token, exactly one block, one block + 1,
# several blocks, and the longest the tiny model's context allows.
CASES = [
    (1, 24),
    (BLOCK, 24),
    (BLOCK + 1, 24),
    (3 * BLOCK, 32),
    (5 * BLOCK + 7, 40),
    (100, 30),
    (TINY_MAX_CONTEXT - 40, 39),
    (TINY_MAX_CONTEXT - 1, 1),
]


@pytest.mark.parametrize(("n_prompt", "n_new"), CASES)
def test_greedy_equals_generate(
    cluster: Cluster,
    tiny_reference: Callable[[list[int], int], list[int]],
    n_prompt: int,
    n_new: int,
) -> None:
    prompt = _prompt(n_prompt, seed=n_prompt)
    want = tiny_reference(prompt, n_new)
    if n_new >= 8:
        assert len(set(want)) >= 4, (
            "reference output is not diverse: the comparison would prove nothing"
        )
    ids, _, last = cluster.generate(prompt_token_ids=prompt, max_tokens=n_new, temperature=0)
    assert ids == want
    assert last.usage.prompt_tokens == n_prompt
    assert last.usage.completion_tokens == len(want)
    assert last.finish_reason == ("stop" if want[-1] == 2 and len(want) < n_new else "length")
    assert last.prefill_worker.startswith("prefill-") and last.decode_worker.startswith("decode-")
    if n_new > 1:
        assert last.timings.kv_transfer_ms > 0  # the KV really moved between workers
        assert last.timings.kv_transport == _transport_of(cluster)  # reported per request
        imports = cluster.decode_hosts[0].kv.metrics.totals()
        assert list(imports) == [_transport_of(cluster)] and imports[_transport_of(cluster)][1] == 0
    cluster.wait_no_leaks()


def test_sixteen_concurrent_streams(
    tiny_cluster: Cluster, tiny_reference: Callable[[list[int], int], list[int]]
) -> None:
    prompts = [_prompt(5 + 9 * i, seed=100 + i) for i in range(16)]
    wants = [tiny_reference(p, 32) for p in prompts]

    def one(p: list[int]) -> list[int]:
        return tiny_cluster.generate(prompt_token_ids=p, max_tokens=32, temperature=0)[0]

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, prompts))
    assert got == wants
    tiny_cluster.wait_no_leaks()


def test_text_prompt_and_ignore_eos(
    tiny_cluster: Cluster, tiny_reference: Callable[[list[int], int], list[int]]
) -> None:
    ids, text, last = tiny_cluster.generate(
        prompt="t5 t6 t7 t8", max_tokens=40, temperature=0, ignore_eos=True
    )
    assert len(ids) == 40 and last.finish_reason == "length"
    assert text.split() == [f"t{i}" for i in ids if i > 2]


def test_kv_handle_lifecycle_in_redis(cluster: Cluster) -> None:
    """Prefill publishes a READY handle; a pull + release (CONSUMED) removes it and frees the blocks."""
    prefill = cluster.prefill_hosts[0]
    decode = cluster.decode_hosts[0]
    total = prefill.engine.stats().total_blocks
    prompt = _prompt(40, seed=7)
    with grpc.insecure_channel(prefill.address) as ch:
        stub = worker_pb2_grpc.PrefillWorkerStub(ch)
        resp = stub.Prefill(_prefill_request("lifecycle-1", prompt, max_tokens=8))
        handle = resp.handle
        assert handle.state == common_pb2.KV_STATE_READY and handle.num_tokens == 40
        assert len(handle.block_ids) == 3
        assert cluster.kv_keys() == 1
        assert prefill.engine.stats().free_blocks == total - 3
        with grpc.insecure_channel(decode.address) as dch:
            tokens = []
            for r in worker_pb2_grpc.DecodeWorkerStub(dch).Decode(
                worker_pb2.DecodeRequest(
                    request_id="lifecycle-1",
                    prompt_token_ids=prompt,
                    sampling=common_pb2.SamplingParams(max_tokens=8),
                    handle=handle,
                )
            ):
                tokens.extend(r.token_ids)
        assert 1 <= len(tokens) <= 7
        # Already consumed: a second release finds nothing.
        assert not stub.ReleaseKv(worker_pb2.ReleaseKvRequest(request_id="lifecycle-1")).released
    cluster.wait_no_leaks()


def test_prefill_of_a_request_id_that_holds_kv_is_refused(cluster: Cluster) -> None:
    """A second Prefill under a held id: ALREADY_EXISTS, the first KV kept, nothing leaked."""
    prefill = cluster.prefill_hosts[0]
    total = prefill.engine.stats().total_blocks
    req = _prefill_request("twice-1", _prompt(40, 11))
    with grpc.insecure_channel(prefill.address) as ch:
        stub = worker_pb2_grpc.PrefillWorkerStub(ch)
        first = stub.Prefill(req).handle
        with pytest.raises(grpc.RpcError) as err:
            stub.Prefill(req)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "twice-1" in (err.value.details() or "")
        assert prefill.engine.held_blocks("twice-1") == (list(first.block_ids), 40)
        assert prefill.engine.stats().free_blocks == total - 3
        assert stub.ReleaseKv(
            worker_pb2.ReleaseKvRequest(request_id="twice-1", consumed=False)
        ).released
        again = stub.Prefill(req).handle  # released: the id is free again
        assert again.num_tokens == 40
        assert stub.ReleaseKv(
            worker_pb2.ReleaseKvRequest(request_id="twice-1", consumed=False)
        ).released
    cluster.wait_no_leaks()


def test_decode_of_a_request_id_that_holds_kv_is_refused(cluster: Cluster) -> None:
    """A Decode whose id already holds KV on the decode worker: ALREADY_EXISTS, and the
    handle it carried is left to its owner (not released on the other request's behalf);
    a handle that does not cover the prompt: INVALID_ARGUMENT."""
    prefill, decode = cluster.prefill_hosts[0], cluster.decode_hosts[0]
    prompt = _prompt(40, 12)
    assert decode.engine.reserve_import("dup-1", 40) is not None  # the other "dup-1"
    with grpc.insecure_channel(prefill.address) as ch:
        stub = worker_pb2_grpc.PrefillWorkerStub(ch)
        handle = stub.Prefill(_prefill_request("dup-1", prompt)).handle
        with grpc.insecure_channel(decode.address) as dch, pytest.raises(grpc.RpcError) as err:
            list(
                worker_pb2_grpc.DecodeWorkerStub(dch).Decode(
                    worker_pb2.DecodeRequest(
                        request_id="dup-1",
                        prompt_token_ids=prompt,
                        sampling=common_pb2.SamplingParams(max_tokens=4),
                        handle=handle,
                    )
                )
            )
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert prefill.engine.held_blocks("dup-1") is not None  # still its owner's
        short = worker_pb2.DecodeRequest(
            request_id="dup-2",
            prompt_token_ids=prompt[:-1],
            sampling=common_pb2.SamplingParams(max_tokens=4),
            handle=handle,
        )
        with grpc.insecure_channel(decode.address) as dch, pytest.raises(grpc.RpcError) as err:
            list(worker_pb2_grpc.DecodeWorkerStub(dch).Decode(short))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "handle.num_tokens" in (err.value.details() or "")
        assert stub.ReleaseKv(
            worker_pb2.ReleaseKvRequest(request_id="dup-1", consumed=False)
        ).released
    assert decode.engine.release("dup-1")
    cluster.wait_no_leaks()


def test_kv_handle_visible_while_in_flight(cluster: Cluster) -> None:
    """Between Prefill and the decode worker's pull the handle is in Redis, then gone."""
    prefill = cluster.prefill_hosts[0]
    with grpc.insecure_channel(prefill.address) as ch:
        stub = worker_pb2_grpc.PrefillWorkerStub(ch)
        stub.Prefill(_prefill_request("held-1", _prompt(20, 3)))
        assert cluster.kv_keys() == 1
        assert stub.ReleaseKv(
            worker_pb2.ReleaseKvRequest(request_id="held-1", consumed=False)
        ).released
    cluster.wait_no_leaks()
