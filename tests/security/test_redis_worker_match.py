"""A scheduler routes only to workers of its own model and KV layout.

A real scheduler with a real prefill and decode worker (tiny model, real
Valkey). Two records that are well-formed but wrong for this deployment are
written into its registry -- a prefill worker of another model and a decode
worker with another KV block size -- both pointing at live worker addresses,
so a scheduler that routed to them would visibly do so. They are not listed,
never chosen, counted once each in ``disagg:registry_bad_records_total`` and
logged; the real workers serve every request. Leak check after.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import redis

from disagg.metastore.embedded import EmbeddedValkey
from disagg.metastore.store import MetaStore
from disagg.metrics import names
from disagg.v1 import common_pb2, scheduler_pb2
from tests.cluster import Cluster

BAD_RECORDS = names.REGISTRY_BAD_RECORDS + "_total"


@pytest.fixture()
def cluster(tiny_model: str, valkey: EmbeddedValkey) -> Iterator[Cluster]:
    with redis.Redis.from_url(valkey.url) as r:
        r.flushall()
    c = Cluster(tiny_model, valkey.url, engine={"compile": False}).start()
    yield c
    c.stop()


def _listed(cluster: Cluster) -> set[str]:
    resp = cluster.stub().ListWorkers(scheduler_pb2.ListWorkersRequest())
    return {w.worker_id for w in resp.workers}


def _impostors(real: list[common_pb2.WorkerInfo]) -> list[common_pb2.WorkerInfo]:
    prefill = next(i for i in real if i.role == common_pb2.WORKER_ROLE_PREFILL)
    decode = next(i for i in real if i.role == common_pb2.WORKER_ROLE_DECODE)
    other_model = common_pb2.WorkerInfo()
    other_model.CopyFrom(prefill)
    other_model.worker_id, other_model.model = "prefill-other-model", "someone-elses-model"
    other_model.free_blocks = other_model.total_blocks * 4  # the most attractive of all
    other_layout = common_pb2.WorkerInfo()
    other_layout.CopyFrom(decode)
    other_layout.worker_id = "decode-other-layout"
    other_layout.layout.block_size = decode.layout.block_size * 2
    other_layout.free_blocks = other_layout.total_blocks * 4
    return [other_model, other_layout]


def test_workers_of_another_model_or_layout_are_skipped_and_counted(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = cluster.app.metrics.registry
    real_ids = _listed(cluster)
    assert len(real_ids) == 2
    before = metrics.get_sample_value(BAD_RECORDS) or 0.0

    async def write(records: list[common_pb2.WorkerInfo] | None) -> list[common_pb2.WorkerInfo]:
        store = MetaStore(cluster.redis_url)
        try:
            real = await store.list_workers()
            for info in records if records is not None else _impostors(real):
                await store.register_worker(info, ttl_s=60.0)
            return real
        finally:
            await store.close()

    with caplog.at_level(logging.WARNING, logger="services.scheduler.registry"):
        cluster.run(write(None))
        for _ in range(8):  # several refreshes see them; each is counted once
            assert _listed(cluster) == real_ids
            ids, _, last = cluster.generate(
                prompt_token_ids=list(range(3, 40)), max_tokens=4, temperature=0
            )
            assert len(ids) == 4
            assert {last.prefill_worker, last.decode_worker} == real_ids
    assert (metrics.get_sample_value(BAD_RECORDS) or 0.0) - before == 2
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "not routing to worker prefill-other-model: model 'someone-elses-model'" in logged
    assert "not routing to worker decode-other-layout: KV layout" in logged

    async def remove() -> None:
        store = MetaStore(cluster.redis_url)
        try:
            for w in ("prefill-other-model", "decode-other-layout"):
                await store.remove_worker(w)
        finally:
            await store.close()

    cluster.run(remove())
    cluster.wait_no_leaks()
