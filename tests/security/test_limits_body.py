"""Bounded input (issue 14, holes 5 and 8) through real clients against a real cluster.

1. An 8 MiB body is a 413 with an OpenAI-style body (official openai client), on both
   generation endpoints, while 4 streams started before it run to their end; an 8 MiB
   gRPC message is RESOURCE_EXHAUSTED from grpc itself.
2. A prompt longer than the context can hold by its length alone is a 400 /
   INVALID_ARGUMENT and is never tokenized; a long prompt is tokenized off the loop.
3. A lone surrogate (JSON "\\ud800") is a 400 over HTTP, INVALID_ARGUMENT over gRPC.
Leak check (blocks and Redis keys) after each.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
from collections.abc import Iterator
from typing import Any

import aiohttp
import grpc
import openai
import pytest
import redis

from disagg.client.errors import from_rpc_error
from disagg.client.retry import RetryPolicy
from disagg.engine.testing import TINY_MAX_CONTEXT
from disagg.metastore.embedded import EmbeddedValkey
from disagg.tokenization.prompts import MAX_CHARS_PER_TOKEN
from disagg.v1 import scheduler_pb2
from services.scheduler.requests import RequestFactory
from tests.http.support import API_KEY, AUTH, CHAT_TEMPLATE, HttpCluster

EIGHT_MIB = 8 << 20
STREAM_TOKENS = 48


@pytest.fixture(scope="module")
def cluster(
    tiny_model: str, valkey: EmbeddedValkey, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HttpCluster]:
    """The tiny model with a chat template, HTTP on, the API key set, default limits."""
    path = str(tmp_path_factory.mktemp("limits") / "tiny-chat")
    shutil.copytree(tiny_model, path)
    cfg_path = os.path.join(path, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    with open(cfg_path, "w") as f:
        json.dump({**cfg, "chat_template": CHAT_TEMPLATE}, f)
    with redis.Redis.from_url(valkey.url) as r:
        r.flushall()
    c = HttpCluster(path, valkey.url)
    c.start()
    yield c
    c.stop()


def _client(cluster: HttpCluster) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=cluster.base_url + "/v1", api_key=API_KEY, max_retries=0)


async def _stream(client: openai.AsyncOpenAI, started: asyncio.Event) -> tuple[str, int]:
    """(finish_reason, completion tokens) of one streamed completion read to its end."""
    stream = await client.completions.create(
        model="tiny-chat",
        prompt="t5 t6 t7 t8",
        max_tokens=STREAM_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    finish, tokens = "", 0
    async for chunk in stream:
        started.set()
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        await asyncio.sleep(0.01)  # a steady reader: the streams outlive the big request
    return finish, tokens


def _assert_413(err: openai.APIStatusError) -> None:
    assert err.status_code == 413
    body = err.response.json()["error"]
    assert body["code"] == "request_too_large" and body["type"] == "invalid_request_error"
    assert str(1 << 20) in body["message"]


async def _big_bodies_while_streaming(cluster: HttpCluster) -> None:
    client = _client(cluster)
    starts = [asyncio.Event() for _ in range(4)]
    streams = [asyncio.create_task(_stream(client, s)) for s in starts]
    await asyncio.wait_for(asyncio.gather(*(s.wait() for s in starts)), 60)
    with pytest.raises(openai.APIStatusError) as err:
        await client.completions.create(model="tiny-chat", prompt="t5 " * (EIGHT_MIB // 3))
    _assert_413(err.value)
    with pytest.raises(openai.APIStatusError) as err:
        await client.chat.completions.create(
            model="tiny-chat", messages=[{"role": "user", "content": "t5 " * (EIGHT_MIB // 3)}]
        )
    _assert_413(err.value)
    assert sum(s.done() for s in streams) < 4, "the streams ended before the big bodies"
    results = await asyncio.wait_for(asyncio.gather(*streams), 120)
    assert results == [("length", STREAM_TOKENS)] * 4
    await client.close()


def test_8mib_body_is_413_while_four_streams_complete(cluster: HttpCluster) -> None:
    asyncio.run(_big_bodies_while_streaming(cluster))
    cluster.wait_no_leaks()


def test_8mib_grpc_message_is_resource_exhausted(cluster: HttpCluster) -> None:
    big = scheduler_pb2.GenerateRequest(prompt="t5 " * (EIGHT_MIB // 3), max_tokens=2)
    with pytest.raises(grpc.RpcError) as err:
        list(cluster.stub().Generate(big, timeout=30))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # grpc's own wording: the client's retry policy knows it fails again and does not retry
    assert RetryPolicy().next_wait(1, from_rpc_error(err.value), None) is None
    ids, _, last = cluster.generate(prompt="t5 t6", max_tokens=3)
    assert len(ids) == 3 and last.finish_reason == "length"
    cluster.wait_no_leaks()


def test_body_under_the_limit_is_not_refused_for_its_size(cluster: HttpCluster) -> None:
    """900 KiB of JSON: parsed (in a thread), then refused for the prompt's length only."""
    status, body = asyncio.run(
        _post(cluster, "/v1/completions", {"prompt": "x" * (900 << 10), "max_tokens": 2})
    )
    assert status == 400 and body["error"]["param"] == "prompt"
    assert "characters" in body["error"]["message"]


async def _post(cluster: HttpCluster, path: str, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(cluster.base_url + path, data=data, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


def _count_builds(monkeypatch: pytest.MonkeyPatch) -> list[threading.Thread]:
    """The thread of every RequestFactory.build call (which tokenizes) from now on."""
    threads: list[threading.Thread] = []
    build = RequestFactory.build

    def counted(factory: RequestFactory, raw: Any) -> Any:
        threads.append(threading.current_thread())
        return build(factory, raw)

    monkeypatch.setattr(RequestFactory, "build", counted)
    return threads


def test_prompt_too_long_for_the_context_is_refused_untokenized(
    cluster: HttpCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    builds = _count_builds(monkeypatch)
    too_long = "t5 " * (TINY_MAX_CONTEXT * MAX_CHARS_PER_TOKEN // 3 + 1)
    status, body = asyncio.run(_post(cluster, "/v1/completions", {"prompt": too_long}))
    assert status == 400 and body["error"]["param"] == "prompt"
    assert "characters" in body["error"]["message"]
    chat = {"messages": [{"role": "user", "content": too_long}]}
    status, body = asyncio.run(_post(cluster, "/v1/chat/completions", chat))
    assert status == 400 and body["error"]["param"] == "messages"
    with pytest.raises(grpc.RpcError) as err:
        list(cluster.stub().Generate(scheduler_pb2.GenerateRequest(prompt=too_long), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "characters" in (err.value.details() or "")
    assert builds == []  # nothing was tokenized
    # Long enough to be tokenized in a thread, short enough to pass the length check:
    # it tokenizes to more tokens than the context, so it is refused after tokenizing.
    status, body = asyncio.run(_post(cluster, "/v1/completions", {"prompt": "t5 " * 1000}))
    assert status == 400 and "tokens" in body["error"]["message"]
    status, _ = asyncio.run(_post(cluster, "/v1/completions", {"prompt": "t5", "max_tokens": 2}))
    assert status == 200
    loop_thread, long_thread = builds[1], builds[0]
    assert long_thread is not loop_thread  # the long prompt: off the loop; the short: on it
    assert loop_thread is cluster._thread
    cluster.wait_no_leaks()


SURROGATES = [  # raw JSON bodies: json.dumps would escape them the same way
    ("/v1/completions", b'{"prompt": "t5 \\ud800 t6", "max_tokens": 2}', "prompt"),
    ("/v1/completions", b'{"prompt": ["t5 \\udfff"], "max_tokens": 2}', "prompt"),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "t5 \\ud83d"}], "max_tokens": 2}',
        "messages",
    ),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
        "messages",
    ),
]


@pytest.mark.parametrize(("path", "raw", "param"), SURROGATES)
def test_lone_surrogate_is_400_over_http(
    cluster: HttpCluster, path: str, raw: bytes, param: str
) -> None:
    status, body = asyncio.run(_post(cluster, path, raw))
    assert status == 400, body
    assert body["error"]["param"] == param and "surrogate" in body["error"]["message"]
    status, _ = asyncio.run(_post(cluster, "/v1/completions", {"prompt": "t5", "max_tokens": 2}))
    assert status == 200


def test_lone_surrogate_is_invalid_argument_over_grpc(cluster: HttpCluster) -> None:
    # The generated stub cannot even encode one: protobuf strings are UTF-8.
    with pytest.raises(UnicodeEncodeError):
        scheduler_pb2.GenerateRequest(prompt="t5 \ud800").SerializeToString()
    # On the wire it can only be bytes that are not UTF-8 (a surrogate's CESU-8 form).
    with grpc.insecure_channel(cluster.address) as channel:
        raw = channel.unary_stream(
            "/disagg.v1.Scheduler/Generate",
            request_serializer=lambda b: b,
            response_deserializer=scheduler_pb2.GenerateResponse.FromString,
        )
        for prompt in (b"\xed\xa0\x80", b"t5 \xed\xbf\xbf t6"):
            message = b"\x0a" + bytes([len(prompt)]) + prompt  # field 1 (prompt), length-delimited
            with pytest.raises(grpc.RpcError) as err:
                list(raw(message, metadata=AUTH, timeout=10))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "UTF-8" in (err.value.details() or "")
    ids, _, _ = cluster.generate(prompt="t5", max_tokens=2)
    assert len(ids) == 2
    cluster.wait_no_leaks()
