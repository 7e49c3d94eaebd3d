"""The official openai client against the system: text equals the gRPC path's, usage is right."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import openai
import pytest

from disagg.v1 import scheduler_pb2
from tests.http.support import API_KEY, HttpCluster

PROMPT = "t5 t9 t33 t101 t7 t250 t12 t64 t3 t77"
MESSAGES: list[Any] = [
    {"role": "system", "content": "t40 t41"},
    {"role": "user", "content": "t5 t9 t33 t101"},
]


@pytest.fixture(scope="module")
def client(http_cluster: HttpCluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=http_cluster.base_url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_models(client: openai.OpenAI, model: str) -> None:
    assert model == "tiny-chat"
    assert client.models.retrieve(model).id == model


def _grpc(cluster: HttpCluster, n: int, **prompt: object) -> scheduler_pb2.GenerateResponse:
    ids, text, last = cluster.generate(max_tokens=n, temperature=0, **prompt)
    assert len(set(ids)) >= 4, "greedy output is not diverse: the comparison would prove nothing"
    last.text = text  # the whole text, for comparing
    return last


def test_completion_equals_grpc(
    http_cluster: HttpCluster, client: openai.OpenAI, model: str
) -> None:
    want = _grpc(http_cluster, 24, prompt=PROMPT)
    got = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage is not None
    assert got.usage.prompt_tokens == want.usage.prompt_tokens == len(PROMPT.split())
    assert got.usage.completion_tokens == want.usage.completion_tokens
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
    http_cluster.wait_no_leaks()


def test_completion_stream_with_usage(
    http_cluster: HttpCluster, client: openai.OpenAI, model: str
) -> None:
    want = _grpc(http_cluster, 24, prompt=PROMPT)
    chunks = list(
        client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == want.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    http_cluster.wait_no_leaks()


def test_token_id_prompt(http_cluster: HttpCluster, client: openai.OpenAI, model: str) -> None:
    ids = [5, 9, 33, 101, 7, 250]
    want_ids, want_text, _ = http_cluster.generate(
        prompt_token_ids=ids, max_tokens=10, temperature=0
    )
    got = client.completions.create(model=model, prompt=ids, max_tokens=10, temperature=0)
    assert got.choices[0].text == want_text
    assert got.usage is not None and got.usage.prompt_tokens == len(ids)
    assert got.usage.completion_tokens == len(want_ids)


def test_chat_equals_grpc(http_cluster: HttpCluster, client: openai.OpenAI, model: str) -> None:
    want = _grpc(http_cluster, 20, messages=[scheduler_pb2.ChatMessage(**m) for m in MESSAGES])
    got = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_completion_tokens=20,
        temperature=0,
    )
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.usage is not None and got.usage.completion_tokens == want.usage.completion_tokens
    assert got.usage.prompt_tokens == want.usage.prompt_tokens
    stream = client.chat.completions.create(
        model=model,
        messages=MESSAGES,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert (
        chunks[-1].usage is not None
        and chunks[-1].usage.completion_tokens == want.usage.completion_tokens
    )
    http_cluster.wait_no_leaks()


def test_stop_and_seed(http_cluster: HttpCluster, client: openai.OpenAI, model: str) -> None:
    full = (
        client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0)
        .choices[0]
        .text
    )
    words = full.split()
    assert len(words) >= 6
    cut = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=24, temperature=0, stop=[words[4]]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert words[4] not in cut.choices[0].text.split() and full.startswith(
        cut.choices[0].text.rstrip()
    )
    a, b = (
        client.completions.create(
            model=model, prompt=PROMPT, max_tokens=16, temperature=1.0, top_p=0.9, seed=1234
        )
        .choices[0]
        .text
        for _ in range(2)
    )
    assert a == b
    http_cluster.wait_no_leaks()


def test_sse_ends_with_done(http_cluster: HttpCluster, model: str) -> None:
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 5, "stream": True}).encode()
    req = urllib.request.Request(
        http_cluster.base_url + "/v1/completions",
        data=body,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in resp.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
