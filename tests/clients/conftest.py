"""Fixtures of the client tests: an in-process cluster with an API key and an in-flight
cap, and the npm packages of the Node client (installed here by `npm ci`, pinned)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from disagg.metastore.embedded import EmbeddedValkey, start_embedded_valkey
from disagg.v1 import scheduler_pb2_grpc
from tests.cluster import Cluster

API_KEY = "client-test-key"
CAPACITY = 2  # the keyed cluster's max_inflight: a third request at once is refused
NODE_DIR = Path(__file__).parent / "node"


class _Key(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def _details(self, details: Any) -> Any:
        return details._replace(
            metadata=[*(details.metadata or ()), ("authorization", f"Bearer {API_KEY}")]
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


class KeyedCluster(Cluster):
    """A Cluster whose scheduler requires API_KEY (its own test stub sends it)."""

    def stub(self) -> scheduler_pb2_grpc.SchedulerStub:
        if not hasattr(self, "_channel"):
            self._channel = grpc.intercept_channel(grpc.insecure_channel(self.address), _Key())
        return scheduler_pb2_grpc.SchedulerStub(self._channel)


@pytest.fixture(scope="module")
def cluster(tiny_model: str, valkey: EmbeddedValkey) -> Iterator[KeyedCluster]:
    with redis.Redis.from_url(valkey.url) as r:
        r.flushall()
    c = KeyedCluster(
        tiny_model, valkey.url, scheduler={"api_key": API_KEY, "max_inflight": CAPACITY}
    )
    c.start()
    yield c
    c.stop()


@pytest.fixture()
def own_cluster(tiny_model: str) -> Iterator[Any]:
    """own_cluster(**kw) -> a started Cluster with a Valkey of its own (beside `cluster`)."""
    made: list[tuple[Cluster, Any]] = []

    def make(**kw: Any) -> Cluster:
        valkey = start_embedded_valkey()
        c = Cluster(tiny_model, valkey.url, **kw)
        made.append((c, valkey))
        return c.start()

    yield make
    for c, valkey in made:
        c.stop()
        valkey.stop()


def npm_ci(folder: Path) -> None:
    """`npm ci` in folder, unless node_modules was installed from this very lockfile."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed (Node.js >= 18 with npm is needed)")
    lock = (folder / "package-lock.json").read_bytes()
    stamp = folder / "node_modules" / ".lock-sha"
    want = hashlib.sha256(lock).hexdigest()
    if stamp.is_file() and stamp.read_text() == want:
        return
    subprocess.run(
        [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=folder,
        check=True,
        timeout=300,
    )
    stamp.write_text(want)


@pytest.fixture(scope="session")
def node_client() -> Path:
    """The Node client's script, its npm packages installed."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    npm_ci(NODE_DIR)
    return NODE_DIR / "generate.js"
