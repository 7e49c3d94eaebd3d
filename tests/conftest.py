"""Shared fixtures: a real Valkey, a tiny random Llama and its greedy reference, SmolLM2."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis

from disagg.engine.testing import GreedyReference, greedy_reference, make_tiny_llama
from disagg.metastore.embedded import EmbeddedValkey, start_embedded_valkey
from tests.cluster import Cluster

# The service processes the tests start (`disagg up`, `disagg prefill`, the benchmarks) run
# their engines eagerly: compiling each process's decode buckets (ADR 0006) cost seconds per
# process, most of the suite's time. The compiled step is proven in-process (tests/engine and
# the engines of tests/cluster.py compile: EngineConfig's default) and through `disagg up` by
# tests/clients/test_up_clients.py, which turns it back on.
os.environ.setdefault("DISAGG_COMPILE", "0")


@pytest.fixture(scope="session")
def valkey() -> Iterator[EmbeddedValkey]:
    server = start_embedded_valkey()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def tiny_reference(tiny_model: str) -> GreedyReference:
    """greedy(prompt, n): transformers generate(do_sample=False) of the tiny model (memoized)."""
    return greedy_reference(tiny_model)


@pytest.fixture(scope="session")
def smollm_path() -> str:
    from disagg.engine.model_loader import resolve_model

    return resolve_model(os.environ.get("DISAGG_TEST_MODEL", ""))


@pytest.fixture(scope="module")
def tiny_cluster(tiny_model: str, valkey: EmbeddedValkey) -> Iterator[Cluster]:
    with redis.Redis.from_url(valkey.url) as r:
        r.flushall()
    cluster = Cluster(tiny_model, valkey.url).start()
    yield cluster
    cluster.stop()
