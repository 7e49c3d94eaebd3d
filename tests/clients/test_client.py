"""disagg.client against a real cluster (in process: real gRPC, Valkey, engines).

Streams (sync and async) equal the transformers greedy reference; closing a stream
or cancelling its task frees the KV on every worker; deadlines; retries of
RESOURCE_EXHAUSTED that honour the server's hint (in-flight cap and SLO
admission) and of UNAVAILABLE with a backoff; API key; TLS/mTLS from DISAGG_TLS_*.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from disagg.client import (
    NO_RETRY,
    AsyncClient,
    Client,
    ClientError,
    DeadlineExceeded,
    GenerateOptions,
    InvalidArgument,
    ResourceExhausted,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
)
from disagg.engine.testing import GreedyReference
from disagg.runtime.tls import TlsFiles
from tests.clients.conftest import API_KEY, CAPACITY, KeyedCluster
from tests.faults.pki import make_pki

PROMPT = list(range(5, 45))  # 40 tokens: three KV blocks of 16
# A stream long enough to interrupt: 200 tokens of PROMPT, greedy.
LONG: GenerateOptions = {
    "prompt_token_ids": PROMPT,
    "max_tokens": 200,
    "ignore_eos": True,
    "temperature": 0.0,
}


def _decode_running(cluster: KeyedCluster) -> int:
    return sum(h.engine.stats().running for h in cluster.decode_hosts if h.engine is not None)


def test_sync_stream_is_the_greedy_reference(
    cluster: KeyedCluster, tiny_reference: GreedyReference
) -> None:
    want = tiny_reference(PROMPT, 12)
    with Client(cluster.address, api_key=API_KEY) as client:
        events = list(client.generate(prompt_token_ids=PROMPT, max_tokens=12, temperature=0))
        done = client.complete(prompt_token_ids=PROMPT, max_tokens=12, temperature=0)
    assert [t for ev in events for t in ev.token_ids] == want
    assert len(set(want)) > 3  # a diverse reference: a broken KV cache would not match it
    last = events[-1]
    assert last.final and all(not ev.final for ev in events[:-1])
    assert last.finish_reason in ("length", "stop") and last.usage is not None
    assert last.usage.prompt_tokens == len(PROMPT)
    assert last.usage.completion_tokens == len(want)
    assert last.timings is not None and last.timings.kv_transfer_ms > 0  # disaggregated
    assert last.prefill_worker.startswith("prefill-") and last.decode_worker.startswith("decode-")
    assert done.token_ids == tuple(want) and done.text == "".join(ev.text for ev in events)
    assert done.finish_reason == last.finish_reason
    assert done.usage.completion_tokens == len(want) and done.usage.cached_prompt_tokens == 32
    cluster.wait_no_leaks()


def test_async_stream_list_workers_and_health(
    cluster: KeyedCluster, tiny_reference: GreedyReference
) -> None:
    async def run() -> tuple[list[int], list[str], str, list[list[int]]]:
        async with AsyncClient(cluster.address, api_key=API_KEY) as client:
            ids = [
                t
                async for ev in client.generate(
                    prompt_token_ids=PROMPT, max_tokens=8, temperature=0
                )
                for t in ev.token_ids
            ]
            roles = sorted(w.role for w in await client.list_workers())
            health = (await client.health()).status
            # CAPACITY at once on one channel: both admitted, both right.
            both = await asyncio.gather(
                *(
                    client.complete(prompt_token_ids=PROMPT[i:], max_tokens=6, temperature=0)
                    for i in range(CAPACITY)
                )
            )
            return ids, roles, health, [list(c.token_ids) for c in both]

    ids, roles, health, both = asyncio.run(run())
    assert ids == tiny_reference(PROMPT, 8)
    assert roles == ["decode", "prefill"] and health == "SERVING"
    assert both == [tiny_reference(PROMPT[i:], 6) for i in range(CAPACITY)]
    cluster.wait_no_leaks()


def test_closing_a_stream_cancels_it_and_frees_the_kv(cluster: KeyedCluster) -> None:
    with Client(cluster.address, api_key=API_KEY) as client:
        stream = client.generate(**LONG)
        got = [next(stream) for _ in range(3)]
        assert all(ev.token_ids and not ev.final for ev in got)
        assert _decode_running(cluster) == 1  # it holds KV on the decode worker now
        stream.close()
        with pytest.raises(StopIteration):
            next(stream)
        cluster.wait_no_leaks(timeout_s=10)
        # A `with` block closes it too; the channel serves the next call.
        with client.generate(**LONG) as s2:
            next(s2)
        cluster.wait_no_leaks(timeout_s=10)
        assert client.complete(prompt_token_ids=PROMPT, max_tokens=2, temperature=0).token_ids


def test_cancelling_the_async_task_frees_the_kv(cluster: KeyedCluster) -> None:
    async def run() -> int:
        async with AsyncClient(cluster.address, api_key=API_KEY) as client:
            started = asyncio.Event()

            async def consume() -> None:
                n = 0
                async for _ in client.generate(**LONG):
                    n += 1
                    if n == 3:  # past the prefill's first token: decoding
                        started.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(started.wait(), 30)
            running = _decode_running(cluster)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return running

    assert asyncio.run(run()) == 1
    cluster.wait_no_leaks(timeout_s=10)


def test_deadline_exceeded(cluster: KeyedCluster) -> None:
    with Client(cluster.address, api_key=API_KEY, timeout=0.1) as client:
        with pytest.raises(DeadlineExceeded) as err:
            for _ in client.generate(**LONG):
                pass
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    cluster.wait_no_leaks(timeout_s=10)


def test_invalid_argument_is_not_retried(cluster: KeyedCluster) -> None:
    retries: list[object] = []
    with Client(cluster.address, api_key=API_KEY, on_retry=lambda *a: retries.append(a)) as client:
        with pytest.raises(InvalidArgument, match="max_tokens"):
            client.complete(prompt_token_ids=PROMPT, max_tokens=0)
        with pytest.raises(InvalidArgument, match="verify"):
            client.complete(prompt_token_ids=PROMPT, max_tokens=2, temperature=1.0, verify=True)
        with pytest.raises(TypeError, match="max_token"):
            client.generate(prompt_token_ids=PROMPT, max_token=2)  # type: ignore[call-arg]
    assert retries == []


def test_api_key(cluster: KeyedCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("", "wrong"):
        with Client(cluster.address, api_key=key) as client:
            with pytest.raises(Unauthenticated):
                client.complete(prompt_token_ids=PROMPT, max_tokens=2)
            with pytest.raises(Unauthenticated):
                client.list_workers()
    monkeypatch.setenv("DISAGG_API_KEY", API_KEY)  # unset argument: from the environment
    with Client(cluster.address) as client:
        assert len(client.list_workers()) == 2
        assert client.complete(prompt_token_ids=PROMPT, max_tokens=2, temperature=0).token_ids


def test_retry_on_resource_exhausted_waits_the_hint(cluster: KeyedCluster) -> None:
    """CAPACITY streams hold every in-flight slot: the next call is refused with a
    1 s hint, waits at least that long, and succeeds once a slot is free."""
    waits: list[tuple[int, ClientError, float]] = []
    refused = threading.Event()

    def on_retry(attempt: int, error: ClientError, wait: float) -> None:
        waits.append((attempt, error, wait))
        refused.set()

    result: dict[str, object] = {}
    with (
        Client(cluster.address, api_key=API_KEY) as holder,
        Client(cluster.address, api_key=API_KEY, on_retry=on_retry) as client,
    ):
        held = [holder.generate(**LONG) for _ in range(CAPACITY)]
        for s in held:
            next(s)  # admitted and streaming
        with pytest.raises(ResourceExhausted) as err:  # without retries: the error and its hint
            Client(cluster.address, api_key=API_KEY, retry=NO_RETRY).complete(
                prompt_token_ids=PROMPT, max_tokens=2
            )
        assert err.value.retry_after_s == 1.0

        def call() -> None:
            result["done"] = client.complete(prompt_token_ids=PROMPT, max_tokens=4, temperature=0)

        worker = threading.Thread(target=call)
        started = time.monotonic()
        worker.start()
        assert refused.wait(30), "the call was never refused"
        for s in held:
            s.close()
        worker.join(60)
        elapsed = time.monotonic() - started
    attempt, error, wait = waits[0]
    assert attempt == 1 and isinstance(error, ResourceExhausted)
    assert error.retry_after_s == 1.0 and wait >= 1.0  # the hint, never less
    assert elapsed >= 1.0  # it did wait before the try that succeeded
    assert getattr(result.get("done"), "finish_reason", None) == "length"
    cluster.wait_no_leaks(timeout_s=10)


def test_retry_gives_up_after_max_attempts_on_slo_rejections(cluster: KeyedCluster) -> None:
    """An SLO no prefill can meet: every try is refused with the policy's hint."""
    waits: list[tuple[int, ClientError, float]] = []
    policy = RetryPolicy(max_attempts=3)
    with Client(
        cluster.address,
        api_key=API_KEY,
        retry=policy,
        on_retry=lambda a, e, w: waits.append((a, e, w)),
    ) as client:
        with pytest.raises(ResourceExhausted, match="SLO") as err:
            client.complete(prompt_token_ids=PROMPT, max_tokens=2, ttft_slo_ms=1e-6)
    assert [a for a, _, _ in waits] == [1, 2]
    for _, e, w in waits:
        assert e.retry_after_s is not None and e.retry_after_s <= w <= e.retry_after_s * 1.2
    assert err.value.retry_after_s is not None


def test_unavailable_is_retried_with_backoff() -> None:
    waits: list[float] = []
    policy = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.1)
    with Client(
        "127.0.0.1:1",
        api_key="",
        tls=TlsFiles(),
        retry=policy,
        on_retry=lambda a, e, w: waits.append(w),
    ) as client:
        with pytest.raises(Unavailable):
            client.complete("t5", max_tokens=2)
    # A deadline shorter than the backoff: no wait, the error at once.
    slow = RetryPolicy(initial_backoff_s=5.0, max_backoff_s=5.0)
    never: list[float] = []
    with Client(
        "127.0.0.1:1",
        tls=TlsFiles(),
        retry=slow,
        timeout=2.0,
        on_retry=lambda a, e, w: never.append(w),
    ) as client:
        with pytest.raises(Unavailable):
            client.complete("t5")
    assert never == []
    assert len(waits) == 3
    assert 0.008 <= waits[0] <= 0.012 and 0.016 <= waits[1] <= 0.024


def test_tls_and_mtls_from_the_environment(
    own_cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    pki = make_pki(tmp_path)
    tls = {"tls_cert": pki.cert, "tls_key": pki.key, "tls_ca": pki.ca}
    read = lambda p: Path(p).read_bytes()  # noqa: E731
    creds = grpc.ssl_channel_credentials(read(pki.ca), read(pki.key), read(pki.cert))
    cluster = own_cluster(worker=tls, scheduler=tls, credentials=creds)
    with Client(cluster.address, tls=TlsFiles(), retry=NO_RETRY) as plain:
        with pytest.raises(Unavailable):
            plain.complete(prompt_token_ids=[5, 6, 7], max_tokens=2)
    no_cert = TlsFiles(ca=pki.ca)  # TLS, but no client certificate: mTLS refuses it
    with Client(cluster.address, tls=no_cert, retry=NO_RETRY) as half:
        with pytest.raises(Unavailable):
            half.list_workers()
    monkeypatch.setenv("DISAGG_TLS_CA", pki.ca)
    monkeypatch.setenv("DISAGG_TLS_CERT", pki.cert)
    monkeypatch.setenv("DISAGG_TLS_KEY", pki.key)
    with Client(cluster.address) as client:
        done = client.complete(prompt_token_ids=[5, 6, 7], max_tokens=6, temperature=0)
        assert client.health().serving

    async def run() -> tuple[int, ...]:
        async with AsyncClient(cluster.address) as aclient:
            return (
                await aclient.complete(prompt_token_ids=[5, 6, 7], max_tokens=6, temperature=0)
            ).token_ids

    assert len(done.token_ids) == 6 and asyncio.run(run()) == done.token_ids
    cluster.wait_no_leaks()


def test_the_readme_example_runs(cluster: KeyedCluster, tmp_path: Path) -> None:
    """The README's client example, as written, against the cluster (address swapped in)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("From Python, `disagg.client`", 1)[1].split("```python\n", 1)[1]
    code = block.split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 10 and "127.0.0.1:50051" in code
    script = tmp_path / "example.py"
    script.write_text(code.replace("127.0.0.1:50051", cluster.address))
    result = subprocess.run(
        [sys.executable, str(script)],
        env={**os.environ, "DISAGG_API_KEY": API_KEY},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "[length]" in result.stdout and "SERVING" in result.stdout
    assert "('decode'," in result.stdout and "('prefill'," in result.stdout
