"""Clients against `disagg up` (a subprocess, tiny model, --verify-fraction 1.0).

1. 50 greedy requests: the scheduler re-runs every one collocated and counts 50
   matches on /metrics; `disagg verify` on the same cluster exits 0.
2. Node.js (@grpc/grpc-js + @grpc/proto-loader, tests/clients/node) streams a greedy
   completion: the same token ids as the Python clients (sync and async); a bad
   request is INVALID_ARGUMENT in both languages.
3. A stream closed early is cancelled on the server (requests_total{cancelled}) and
   its KV is freed everywhere: every worker's pool full again (heartbeats) and no
   KV record left in Redis.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from disagg.client import AsyncClient, Client, InvalidArgument
from disagg.engine.testing import GreedyReference
from disagg.metastore.keys import KV_PATTERN
from disagg.metrics import scrape
from tests.e2e.test_up import READY_TIMEOUT_S, UpProcess, system_procs
from tests.ports import free_port as _free_port

REPO = Path(__file__).resolve().parents[2]
N_VERIFIED = 50


class Up:
    def __init__(self, proc: UpProcess, http_port: int, ready_line: str):
        self.proc = proc
        self.address = proc.address
        self.http_port = http_port
        m = re.search(r"redis=(\S+)", ready_line)
        assert m, ready_line
        self.redis_url = m.group(1)

    def metrics(self) -> scrape.Samples:
        url = f"http://127.0.0.1:{self.http_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return scrape.parse(resp.read().decode())

    def wait_for(self, what: str, cond: Callable[[], bool], timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not after {timeout_s}s\n{self.proc.logs()}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def up(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    http_port = _free_port()
    extra = ("--verify-fraction", "1.0", "--http-port", str(http_port))
    log = tmp_path_factory.mktemp("up-clients") / "up.log"
    # The engines compile their step (the product's default; tests/conftest.py turns it off
    # for the other service processes the suite starts): the compiled path through `disagg up`.
    proc = UpProcess(tiny_model, log, extra=extra, env={"DISAGG_COMPILE": "1"})
    try:
        yield Up(proc, http_port, proc.wait_ready(READY_TIMEOUT_S))
    finally:
        proc.kill_everything(system_procs(proc.proc.pid, proc.port))


def _prompt(i: int) -> list[int]:
    return [5 + (7 * i + j) % 500 for j in range(20 + i % 30)]  # 20-49 tokens: 2-4 blocks


def test_fifty_greedy_requests_fifty_matches(up: Up, tmp_path: Path) -> None:
    before = up.metrics()

    async def send() -> list[int]:
        async with AsyncClient(up.address) as client:
            limit = asyncio.Semaphore(8)

            async def one(i: int) -> int:
                async with limit:
                    c = await client.complete(
                        prompt_token_ids=_prompt(i), max_tokens=12, temperature=0
                    )
                    return len(c.token_ids)

            return await asyncio.gather(*(one(i) for i in range(N_VERIFIED)))

    assert all(n > 0 for n in asyncio.run(send()))

    def checked() -> float:
        return sum(
            scrape.delta(before, up.metrics(), "disagg:verify_total", result=r)
            for r in ("match", "mismatch")
        )

    up.wait_for("50 verifications", lambda: checked() >= N_VERIFIED)
    after = up.metrics()
    assert scrape.delta(before, after, "disagg:verify_total", result="match") == N_VERIFIED
    assert scrape.delta(before, after, "disagg:verify_total", result="mismatch") == 0
    assert "verify mismatch" not in up.proc.logs()

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "".join(json.dumps({"prompt_token_ids": _prompt(i)}) + "\n" for i in range(4))
    )
    argv = ["verify", "--address", up.address, "--prompts", str(prompts), "--max-tokens", "12"]
    result = subprocess.run(
        [sys.executable, "-m", "disagg.cli", *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verified 4 prompts: 0 mismatches" in result.stdout


def _node(script: Path, address: str, request: dict[str, object]) -> list[dict[str, object]]:
    out = subprocess.run(
        ["node", str(script), address, json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_node_client_streams_what_python_does(
    up: Up, node_client: Path, tiny_reference: GreedyReference
) -> None:
    prompt = _prompt(3)
    lines = _node(
        node_client,
        up.address,
        {"prompt_token_ids": prompt, "max_tokens": 16, "temperature": 0},
    )
    assert not any("error" in line for line in lines), lines
    node_ids = [t for line in lines for t in line["token_ids"]]  # type: ignore[attr-defined]
    assert len(lines) > 2 and lines[-1]["finish_reason"] in ("length", "stop")
    assert all(not line["finish_reason"] for line in lines[:-1])  # streamed, not one reply

    with Client(up.address) as client:
        py = client.complete(prompt_token_ids=prompt, max_tokens=16, temperature=0)

    async def py_async() -> tuple[int, ...]:
        async with AsyncClient(up.address) as client:
            return (
                await client.complete(prompt_token_ids=prompt, max_tokens=16, temperature=0)
            ).token_ids

    assert node_ids == list(py.token_ids) == list(asyncio.run(py_async()))
    assert node_ids == tiny_reference(prompt, 16)
    assert "".join(str(line["text"]) for line in lines) == py.text

    bad = _node(node_client, up.address, {"prompt_token_ids": prompt, "max_tokens": 0})
    assert len(bad) == 1 and bad[0]["error"]["name"] == "INVALID_ARGUMENT"  # type: ignore[index]
    assert bad[0]["error"]["code"] == 3 and "max_tokens" in bad[0]["error"]["details"]  # type: ignore[index]
    with Client(up.address) as client, pytest.raises(InvalidArgument, match="max_tokens"):
        client.complete(prompt_token_ids=prompt, max_tokens=0)


def test_closing_a_stream_frees_the_kv_everywhere(up: Up) -> None:
    before = up.metrics()
    with Client(up.address) as client:
        stream = client.generate(
            prompt_token_ids=_prompt(5), max_tokens=200, ignore_eos=True, temperature=0
        )
        got = [next(stream) for _ in range(3)]
        stream.close()
        assert not any(ev.final for ev in got)

        seen: list[object] = []

        def freed() -> bool:
            workers = client.list_workers()
            with redis.Redis.from_url(up.redis_url) as r:
                keys = list(r.scan_iter(match=KV_PATTERN))
            seen[:] = [keys, [(w.worker_id, w.free_blocks, w.total_blocks) for w in workers]]
            return not keys and all(w.free_blocks == w.total_blocks for w in workers)

        try:
            up.wait_for("every block free, no KV record", freed, timeout_s=120)
        except AssertionError as e:
            raise AssertionError(f"kv keys, (worker, free, total): {seen}") from e
    up.wait_for(
        "the cancellation counted",
        lambda: (
            scrape.delta(before, up.metrics(), "disagg:requests_total", finish_reason="cancelled")
            == 1
        ),
        timeout_s=30,
    )
