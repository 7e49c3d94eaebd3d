"""Pure pieces: request parsing, auth, bench arrivals / SLO / summary."""

from __future__ import annotations

import statistics

import pytest

from disagg.bench.arrivals import gaps
from disagg.bench.backends import RequestResult
from disagg.bench.report import parse_slo, summarize, table
from disagg.engine.model_loader import default_cache_dir, served_name
from services.scheduler.auth import bearer_ok, grpc_metadata_ok
from services.scheduler.http_api import ApiError, parse_body


def test_parse_completion_fields() -> None:
    p = parse_body(
        {
            "model": "m",
            "prompt": ["t5 t6"],
            "max_tokens": 7,
            "temperature": 0,
            "top_p": 0.5,
            "seed": 3,
            "stop": "x",
            "n": 1,
            "logprobs": None,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        chat=False,
    )
    assert (p.raw.prompt, p.raw.max_tokens, p.raw.temperature, p.raw.top_p, p.raw.seed) == (
        "t5 t6",
        7,
        0,
        0.5,
        3,
    )
    assert list(p.raw.stop) == ["x"] and p.stream and p.include_usage and p.model == "m"
    assert list(parse_body({"prompt": [[4, 5]]}, chat=False).raw.prompt_token_ids) == [4, 5]


def test_parse_chat_fields() -> None:
    p = parse_body(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ],
            "max_tokens": 3,
            "max_completion_tokens": 5,
            "logprobs": False,
        },
        chat=True,
    )
    assert p.raw.messages[0].content == "ab" and p.raw.max_tokens == 5
    assert p.param_map["max_tokens"] == "max_completion_tokens"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "seed": 1.5}, "seed"),
        ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
        ({"prompt": "x", "best_of": 2}, "best_of"),
        ({}, "prompt"),
    ],
)
def test_parse_rejects(body: dict[str, object], param: str) -> None:
    with pytest.raises(ApiError) as e:
        parse_body(body, chat=False)
    assert e.value.status == 400 and e.value.param == param


def test_served_model_name() -> None:
    assert served_name(default_cache_dir()) == "SmolLM2-135M-Instruct"
    assert served_name("/models/Qwen2-0.5B/") == "Qwen2-0.5B"


def test_auth() -> None:
    assert bearer_ok(None, "") and bearer_ok("Bearer k", "k") and bearer_ok("bearer  k ", "k")
    assert not bearer_ok("Bearer x", "k") and not bearer_ok("k", "k") and not bearer_ok(None, "k")
    assert grpc_metadata_ok([("authorization", "Bearer k")], "k")
    assert not grpc_metadata_ok([("x-other", "Bearer k")], "k")


def test_arrivals() -> None:
    g = gaps(4000, rate=50.0, seed=1)
    assert statistics.mean(g) == pytest.approx(1 / 50, rel=0.05)
    assert statistics.stdev(g) == pytest.approx(1 / 50, rel=0.1)  # Poisson: CV 1
    bursty = gaps(4000, rate=50.0, burstiness=0.25, seed=1)
    assert statistics.stdev(bursty) > 1.5 * statistics.stdev(g)
    assert gaps(3, rate=float("inf")) == [0.0, 0.0, 0.0]


def test_slo_and_goodput() -> None:
    assert parse_slo("ttft_ms=500,tpot_ms=50") == {"ttft_ms": 500.0, "tpot_ms": 50.0}
    assert parse_slo("ttft:100 e2el:900") == {"ttft_ms": 100.0, "e2el_ms": 900.0}
    with pytest.raises(ValueError):
        parse_slo("speed=3")
    fast = RequestResult(
        success=True, ttft=0.1, latency=0.5, itl=[0.1] * 4, prompt_len=10, output_tokens=5
    )
    slow = RequestResult(
        success=True, ttft=0.9, latency=1.3, itl=[0.1] * 4, prompt_len=10, output_tokens=5
    )
    failed = RequestResult(error="HTTP 429")
    s = summarize([fast, slow, failed], 2.0, 10.0, None, {"ttft_ms": 500, "tpot_ms": 150})
    assert (s.completed, s.failed, s.good, s.goodput) == (2, 1, 1, 0.5)
    assert s.tpot_ms.mean == pytest.approx(100.0) and s.ttft_ms.mean == pytest.approx(500.0)
    assert "Request goodput (req/s):                 0.50" in table(s)
