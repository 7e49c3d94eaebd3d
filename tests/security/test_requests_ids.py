"""Client request ids are echoed, never keys (issue 14, hole 3).

Through real gRPC against the in-process tiny cluster:

1. The same request_id sent again while the original streams, the duplicates
   cancelled at different points (before their first token, after it, mid
   decode, and a storm of them each cancelled within 10 ms of its send), on
   the disaggregated and on the collocated path: the original
   completes exactly (greedy-equal to transformers), every response echoes the
   client's id, each request ran under its own internal id, and no KV block or
   Redis key is left behind.
2. A client id that is too long or outside [A-Za-z0-9._:-] is INVALID_ARGUMENT;
   no id: the response carries the server's (a fresh internal id).
3. A log line cannot be forged through a value: quoted, escaped.
"""

from __future__ import annotations

import io
import logging
import random
import re
import threading
import time
from typing import Any

import grpc
import pytest

from disagg.engine.testing import GreedyReference, prompt_of
from disagg.runtime.ids import CLIENT_ID_MAX_LEN
from disagg.runtime.logs import OneLineFormatter
from disagg.v1 import scheduler_pb2
from tests.cluster import Cluster

N_NEW = 150
CANCEL_AFTER = (0, 1, 4)  # responses a duplicate reads before it cancels (0: at once)
STORM = 10  # more duplicates, sent 10 ms apart, each cancelled within 10 ms
DECISION = re.compile(r"decision request_id=(\S+) client_request_id=(\S+) ")


def _pins(cluster: Cluster, path: str) -> dict[str, str]:
    if path == "disaggregated":
        return {}
    workers = cluster.stub().ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=5).workers
    decode = next(w.worker_id for w in workers if w.worker_id.startswith("decode-"))
    return {"prefill_worker": decode, "decode_worker": decode}  # the decode worker prefills


def _duplicate(cluster: Cluster, req: scheduler_pb2.GenerateRequest, after: int) -> list[str]:
    """Sends req, reads ``after`` responses, cancels; the ids its responses echoed."""
    call = cluster.stub().Generate(req, timeout=60)
    echoed: list[str] = []
    if after == 0:
        call.cancel()
    else:
        try:
            for n, resp in enumerate(call, 1):
                echoed.append(resp.request_id)
                if n >= after:
                    call.cancel()
                    break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.CANCELLED, e
    return echoed


@pytest.mark.parametrize("path", ["disaggregated", "collocated"])
def test_duplicate_id_cancelled_mid_flight_leaves_the_original_exact(
    tiny_cluster: Cluster,
    tiny_reference: GreedyReference,
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    caplog.set_level(logging.INFO, logger="disagg.decisions")
    cid = f"dup-{path}"
    prompt = prompt_of(64, seed=300)
    want = tiny_reference(prompt, N_NEW)
    req = scheduler_pb2.GenerateRequest(
        request_id=cid,
        prompt_token_ids=prompt,
        max_tokens=N_NEW,
        temperature=0,
        **_pins(tiny_cluster, path),
    )
    first = threading.Event()
    got: dict[str, Any] = {"ids": [], "echo": set(), "finish": ""}

    def original() -> None:
        try:
            for resp in tiny_cluster.stub().Generate(req, timeout=120):
                got["ids"].extend(resp.token_ids)
                got["echo"].add(resp.request_id)
                got["finish"] = resp.finish_reason or got["finish"]
                first.set()
        except grpc.RpcError as e:
            got["finish"] = f"status {e.code()}: {e.details()}"
        finally:
            got["done_at"] = time.monotonic()
            first.set()

    main = threading.Thread(target=original)
    main.start()
    assert first.wait(60), "the original never streamed"
    echoes: list[list[str]] = [[] for _ in CANCEL_AFTER]
    cancelled_at: list[float] = [0.0] * len(CANCEL_AFTER)

    def duplicate(i: int) -> None:
        echoes[i] = _duplicate(tiny_cluster, req, CANCEL_AFTER[i])
        cancelled_at[i] = time.monotonic()

    def storm(i: int) -> None:
        """Staggered sends each cancelled within 10 ms: with the client's id as the
        engine key, some landed between a worker's submit and its refusal, and the
        abort hit the original (or leaked its blocks)."""
        time.sleep(0.01 * i)
        call = tiny_cluster.stub().Generate(req, timeout=60)
        time.sleep(random.Random(i).random() * 0.01)
        call.cancel()

    dups = [threading.Thread(target=duplicate, args=(i,)) for i in range(len(CANCEL_AFTER))]
    dups += [threading.Thread(target=storm, args=(i,)) for i in range(STORM)]
    for t in dups:
        t.start()
    for t in [*dups, main]:
        t.join(120)
        assert not t.is_alive(), "a stream hung"

    assert min(cancelled_at) < got["done_at"], "no duplicate overlapped the original's stream"
    assert got["finish"] == "length", got["finish"]
    assert got["ids"] == want  # exact: nothing aborted, nothing mixed in
    tiny_cluster.wait_no_leaks(timeout_s=10)
    assert got["echo"] == {cid} and all(set(e) <= {cid} for e in echoes)
    internal = [m[1] for m in map(DECISION.search, caplog.messages) if m and m[2] == cid]
    # One decision per request that reached the scheduler (one cancelled at once may not).
    assert len(internal) >= 1 + sum(1 for a in CANCEL_AFTER if a), internal
    assert len(set(internal)) == len(internal)  # no two requests share an internal id
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in internal)


@pytest.mark.parametrize(
    "bad",
    [
        "x" * (CLIENT_ID_MAX_LEN + 1),
        "two words",
        "a=b",
        'q"uote',
        "line\nrequest_id=forged",
        "caf\u00e9",
        "semi;colon",
        "slash/ed",
    ],
)
def test_bad_client_ids_are_invalid_argument(tiny_cluster: Cluster, bad: str) -> None:
    req = scheduler_pb2.GenerateRequest(request_id=bad, prompt_token_ids=[5, 6, 7], max_tokens=2)
    with pytest.raises(grpc.RpcError) as err:
        list(tiny_cluster.stub().Generate(req, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in (err.value.details() or "")


def test_good_client_ids_are_echoed_and_none_gets_one(tiny_cluster: Cluster) -> None:
    for cid in ("A-z_0.9:x", "y" * CLIENT_ID_MAX_LEN):
        _, _, last = tiny_cluster.generate(
            request_id=cid, prompt_token_ids=[5, 6, 7], max_tokens=2, temperature=0
        )
        assert last.request_id == cid
    _, _, last = tiny_cluster.generate(prompt_token_ids=[5, 6, 7], max_tokens=2, temperature=0)
    assert re.fullmatch(r"[0-9a-f]{32}", last.request_id)
    tiny_cluster.wait_no_leaks()


def test_a_value_cannot_forge_a_log_field() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(OneLineFormatter("scheduler"))
    log = logging.getLogger("tests.security.ids")
    log.addHandler(handler)
    log.propagate = False
    try:
        evil = 'x request_id=forged\n2026-01-01T00:00:00Z INFO fake "\x1b[2J'
        log.warning("seen", extra={"client_request_id": evil})
    finally:
        log.removeHandler(handler)
    line = out.getvalue()
    assert line.count("\n") == 1 and "\x1b" not in line
    fields = re.findall(r' (\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)
    assert [k for k, _ in fields] == ["client_request_id", "logger"]
