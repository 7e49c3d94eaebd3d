"""Bad HTTP input: the right status, an OpenAI-style error body, and the next request still works."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import grpc
import pytest

from disagg.v1 import scheduler_pb2, scheduler_pb2_grpc
from tests.http.support import API_KEY, HttpCluster

OK = {"prompt": "t5 t6 t7", "max_tokens": 3, "temperature": 0}


def _post(
    cluster: HttpCluster, path: str, body: bytes, key: str | None = API_KEY
) -> tuple[int, Any, Any]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(cluster.base_url + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read()), resp.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def _assert_error(body: Any, param: str | None, code: str | None) -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and err["type"]
    assert err["param"] == param
    if code is not None:
        assert err["code"] == code


def _ok(cluster: HttpCluster, model: str) -> None:
    status, body, _ = _post(cluster, "/v1/completions", json.dumps({"model": model, **OK}).encode())
    assert status == 200 and body["usage"]["completion_tokens"] >= 1


@pytest.fixture(scope="module")
def model(http_cluster: HttpCluster) -> str:
    req = urllib.request.Request(
        http_cluster.base_url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return str(json.load(resp)["data"][0]["id"])


CASES = [  # (path, body or raw bytes, status, param, code)
    ("/v1/completions", b"{not json", 400, None, "invalid_json"),
    ("/v1/completions", b"[1, 2]", 400, None, "invalid_type"),
    ("/v1/completions", {"max_tokens": "ten"}, 400, "max_tokens", "invalid_type"),
    ("/v1/completions", {"temperature": "hot"}, 400, "temperature", "invalid_type"),
    ("/v1/completions", {"stream": "yes"}, 400, "stream", "invalid_type"),
    ("/v1/completions", {"stop": 5}, 400, "stop", "invalid_type"),
    ("/v1/completions", {"max_tokens": -1}, 400, "max_tokens", None),
    ("/v1/completions", {"max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/completions", {"max_tokens": 100000}, 400, "max_tokens", None),
    ("/v1/completions", {"temperature": -0.5}, 400, "temperature", None),
    ("/v1/completions", {"top_p": 0}, 400, "top_p", None),
    ("/v1/completions", {"n": 2}, 400, "n", "unsupported_value"),
    ("/v1/completions", {"logprobs": 2}, 400, "logprobs", "unsupported_parameter"),
    ("/v1/completions", {"echo": True}, 400, "echo", "unsupported_parameter"),
    ("/v1/completions", {"prompt": ["t5", "t6"]}, 400, "prompt", "unsupported_value"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {"prompt": [100000]}, 400, "prompt", None),
    ("/v1/completions", {"stream_options": {"include_usage": True}}, 400, "stream_options", None),
    ("/v1/completions", {"model": "gpt-4o"}, 404, "model", "model_not_found"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "t5"}], "n": 3},
        400,
        "n",
        None,
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "t5"}], "logprobs": True},
        400,
        "logprobs",
        None,
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "t5"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
        400,
        "tools",
        None,
    ),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages", "invalid_type"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "wizard", "content": "t5"}]},
        400,
        "messages",
        None,
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "t5"}], "max_completion_tokens": -3},
        400,
        "max_completion_tokens",
        None,
    ),
    ("/v1/nowhere", {}, 404, None, "not_found"),
]


@pytest.mark.parametrize(("path", "body", "status", "param", "code"), CASES)
def test_bad_input(
    http_cluster: HttpCluster,
    model: str,
    path: str,
    body: Any,
    status: int,
    param: str | None,
    code: str | None,
) -> None:
    if isinstance(body, dict):
        base = (
            {"model": model}
            if "messages" in body or path.endswith("/chat/completions")
            else {"model": model, **OK}
        )
        body = json.dumps({**base, **body}).encode()
    got, err, _ = _post(http_cluster, path, body)
    assert got == status, err
    _assert_error(err, param, code)
    _ok(http_cluster, model)


@pytest.mark.parametrize("key", [None, "wrong-key", ""])
def test_wrong_api_key(http_cluster: HttpCluster, model: str, key: str | None) -> None:
    status, err, _ = _post(
        http_cluster, "/v1/completions", json.dumps({"model": model, **OK}).encode(), key=key
    )
    assert status == 401
    _assert_error(err, None, "invalid_api_key")
    _ok(http_cluster, model)


def test_grpc_api_key(http_cluster: HttpCluster) -> None:
    with grpc.insecure_channel(http_cluster.address) as channel:
        stub = scheduler_pb2_grpc.SchedulerStub(channel)
        for md in ((), (("authorization", "Bearer nope"),)):
            with pytest.raises(grpc.RpcError) as e:
                list(
                    stub.Generate(
                        scheduler_pb2.GenerateRequest(prompt="t5", max_tokens=2), metadata=md
                    )
                )
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.Generate(
            scheduler_pb2.GenerateRequest(prompt="t5", max_tokens=2),
            metadata=(("authorization", f"Bearer {API_KEY}"),),
        )
        assert list(ok)[-1].finish_reason


def test_open_endpoints(http_cluster: HttpCluster) -> None:
    with urllib.request.urlopen(http_cluster.base_url + "/health", timeout=10) as resp:
        assert resp.status == 200 and json.load(resp)["status"] == "ok"
    with urllib.request.urlopen(http_cluster.base_url + "/metrics", timeout=10) as resp:
        assert resp.status == 200 and b"disagg:requests_total" in resp.read()


def test_overloaded_is_429(
    http_cluster: HttpCluster, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_cluster.app.orchestrator, "_max_inflight", 0)
    status, err, headers = _post(
        http_cluster, "/v1/completions", json.dumps({"model": model, **OK}).encode()
    )
    assert status == 429 and int(headers["Retry-After"]) >= 1
    _assert_error(err, None, "rate_limit_exceeded")
    monkeypatch.undo()
    _ok(http_cluster, model)


def test_no_worker_is_503(
    http_cluster: HttpCluster, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = http_cluster.app.orchestrator._registry
    monkeypatch.setattr(registry, "snapshot", lambda: [])
    status, err, _ = _post(
        http_cluster, "/v1/completions", json.dumps({"model": model, **OK}).encode()
    )
    assert status == 503
    _assert_error(err, None, "service_unavailable")
    monkeypatch.undo()
    _ok(http_cluster, model)
