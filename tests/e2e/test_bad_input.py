"""Bad input gets a clear status naming the field, and the system stays healthy."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import grpc
import pytest

from disagg.engine.testing import TINY_MAX_CONTEXT, TINY_VOCAB
from disagg.v1 import scheduler_pb2
from tests.cluster import Cluster

BAD = [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt_token_ids": [5], "max_tokens": 0}, "max_tokens"),
    ({"prompt_token_ids": [5], "max_tokens": -3}, "max_tokens"),
    ({"prompt_token_ids": [5] * 10, "max_tokens": TINY_MAX_CONTEXT}, "max_tokens"),
    ({"prompt_token_ids": [5], "temperature": -0.5}, "temperature"),
    ({"prompt_token_ids": [5], "temperature": float("nan")}, "temperature"),
    ({"prompt_token_ids": [5], "top_p": 0.0}, "top_p"),
    ({"prompt_token_ids": [5], "top_p": 1.5}, "top_p"),
    ({"prompt_token_ids": [5], "top_k": -1}, "top_k"),
    ({"prompt_token_ids": [5] * TINY_MAX_CONTEXT}, "prompt"),
    ({"prompt_token_ids": [5] * (TINY_MAX_CONTEXT + 50), "max_tokens": 1}, "prompt"),
    ({"prompt_token_ids": [TINY_VOCAB + 1]}, "prompt_token_ids"),
    ({"prompt_token_ids": [-1]}, "prompt_token_ids"),
    ({"prompt": "t5", "prompt_token_ids": [5]}, "prompt_token_ids"),
    ({"prompt_token_ids": [5], "stop": [""]}, "stop"),
]


@pytest.mark.parametrize(("fields", "field"), BAD, ids=[f"{f}:{i}" for i, (_, f) in enumerate(BAD)])
def test_invalid_argument_names_the_field(
    tiny_cluster: Cluster, fields: dict[str, Any], field: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(tiny_cluster.stub().Generate(scheduler_pb2.GenerateRequest(**fields)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in err.value.details()
    ids, _, last = tiny_cluster.generate(prompt_token_ids=[5, 6, 7], max_tokens=4, temperature=0)
    assert len(ids) == 4 and last.finish_reason == "length"
    tiny_cluster.wait_no_leaks()


@pytest.mark.parametrize("pin", ["prefill_worker", "decode_worker"])
def test_unknown_worker_is_unavailable(tiny_cluster: Cluster, pin: str) -> None:
    req = scheduler_pb2.GenerateRequest(
        prompt_token_ids=[5, 6], max_tokens=3, **{pin: "127.0.0.1:1"}
    )
    with pytest.raises(grpc.RpcError) as err:
        list(tiny_cluster.stub().Generate(req))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert pin in err.value.details()
    assert len(tiny_cluster.generate(prompt_token_ids=[5, 6], max_tokens=3)[0]) == 3
    tiny_cluster.wait_no_leaks()


def test_pinned_workers_are_used(tiny_cluster: Cluster) -> None:
    p, d = tiny_cluster.prefill_hosts[0], tiny_cluster.decode_hosts[0]
    _, _, last = tiny_cluster.generate(
        prompt_token_ids=[5, 6], max_tokens=3, prefill_worker=p.address, decode_worker=d.worker_id
    )
    assert (last.prefill_worker, last.decode_worker) == (p.worker_id, d.worker_id)


def test_stop_strings_and_seeded_sampling(tiny_cluster: Cluster) -> None:
    _ids, text, _ = tiny_cluster.generate(
        prompt="t5 t6 t7", max_tokens=30, temperature=0, ignore_eos=True
    )
    words = text.split()
    stop = f" {words[3]}"
    first = text.index(stop)
    _, stopped, last = tiny_cluster.generate(
        prompt="t5 t6 t7", max_tokens=30, temperature=0, ignore_eos=True, stop=[stop]
    )
    assert stopped == text[:first] and last.finish_reason == "stop"
    a = tiny_cluster.generate(prompt="t5 t6 t7", max_tokens=20, temperature=1.0, seed=1234)[0]
    b = tiny_cluster.generate(prompt="t5 t6 t7", max_tokens=20, temperature=1.0, seed=1234)[0]
    assert a == b
    tiny_cluster.wait_no_leaks()


@pytest.mark.parametrize(
    ("argv", "env", "says"),
    [
        (["prefill", "--prefill-cost", "1,x"], {}, "prefill_cost must be BASE_MS,PER_TOKEN_MS"),
        (["decode"], {"DISAGG_PREFILL_COST": "-1,0.1"}, "prefill_cost: both numbers"),
        (["decode"], {"DISAGG_HEARTBEAT_S": "5"}, "heartbeat_ttl_s must exceed heartbeat_s"),
        (["scheduler"], {"DISAGG_MAX_INFLIGHT": "0"}, "max_inflight must be > 0"),
    ],
)
def test_bad_configuration_is_one_line_not_a_traceback(
    argv: list[str], env: dict[str, str], says: str
) -> None:
    """The services' command lines refuse a bad flag or DISAGG_* value before starting
    anything: exit status 1 and one line naming it on stderr."""
    run = subprocess.run(
        [sys.executable, "-m", "disagg.cli", *argv],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"disagg {argv[0]}: invalid configuration: ")
    assert says in lines[0]
