"""A request no decode worker's KV pool can hold is refused up front, naming the field.

Decode pools of 8 blocks x 16 tokens = 128 tokens (the tiny model's context is 256): a
prompt of 20 tokens with max_tokens 200 fits the context but no pool. Before, it reached a
worker, which failed it after routing (or, on a worker that preempts to make room, kept it
running while shorter requests starved). Now: INVALID_ARGUMENT over gRPC, 400 with an
OpenAI-style body over HTTP (the official client), and the same cluster serves a request
that fits, without leaking a block.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import openai
import pytest

from disagg.metastore.embedded import EmbeddedValkey
from disagg.v1 import scheduler_pb2
from tests.faults.conftest import flush
from tests.http.support import API_KEY, HttpCluster


@pytest.fixture(scope="module")
def small_pools(tiny_model: str, valkey: EmbeddedValkey) -> Iterator[HttpCluster]:
    flush(valkey.url)
    c = HttpCluster(tiny_model, valkey.url, engine={"num_blocks": 8, "compile": False}).start()
    yield c
    c.stop()


def test_prompt_plus_max_tokens_beyond_every_pool_is_invalid_argument(
    small_pools: HttpCluster, tiny_reference
) -> None:  # type: ignore[no-untyped-def]
    prompt = list(range(5, 25))
    with pytest.raises(grpc.RpcError) as err:
        list(
            small_pools.stub().Generate(
                scheduler_pb2.GenerateRequest(prompt_token_ids=prompt, max_tokens=200)
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_tokens" in (err.value.details() or "") and "128 tokens" in (
        err.value.details() or ""
    )

    client = openai.OpenAI(base_url=small_pools.base_url + "/v1", api_key=API_KEY, max_retries=0)
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=model, prompt=prompt, max_tokens=200)
    assert bad.value.status_code == 400
    body = bad.value.body
    assert isinstance(body, dict) and "max_tokens" in str(body.get("message", body))

    ids, _, last = small_pools.generate(prompt_token_ids=prompt, max_tokens=40, temperature=0)
    assert ids == tiny_reference(prompt, 40) and last.finish_reason == "length"
    small_pools.wait_no_leaks()
