"""Workers measure their prefill cost at startup; the scheduler starts from it."""

from __future__ import annotations

import pytest
import redis

from disagg.metastore.embedded import EmbeddedValkey
from disagg.policy.cost import CostModel
from disagg.runtime.config import WorkerConfig, from_env
from disagg.v1 import scheduler_pb2
from tests.cluster import Cluster


def test_startup_calibration_is_published_and_used(tiny_model: str, valkey: EmbeddedValkey) -> None:
    with redis.Redis.from_url(valkey.url) as r:
        r.flushall()
    cluster = Cluster(tiny_model, valkey.url, prefill=2, decode=1).start()
    try:
        workers = cluster.stub().ListWorkers(scheduler_pb2.ListWorkersRequest()).workers
        assert len(workers) == 3
        for w in workers:
            assert w.prefill_ms_per_token >= 0 and w.prefill_base_ms >= 0, w
            assert w.prefill_base_ms + w.prefill_ms_per_token > 0, w  # measured
        costs = cluster.app.orchestrator._registry.costs
        for w in workers:  # before any request: the worker's own measurement, not the prior
            assert costs[w.worker_id] == CostModel(w.prefill_base_ms, w.prefill_ms_per_token)
        # The prediction it gives is the worker's measured line.
        w = workers[0]
        assert (
            costs[w.worker_id].prefill_ms(100) == w.prefill_base_ms + 100 * w.prefill_ms_per_token
        )
        cluster.wait_no_leaks()  # the calibration prefills left nothing behind
    finally:
        cluster.stop()


def test_a_configured_prefill_cost_is_published_instead(
    tiny_model: str, valkey: EmbeddedValkey
) -> None:
    with redis.Redis.from_url(valkey.url) as r:
        r.flushall()
    cluster = Cluster(tiny_model, valkey.url, worker={"prefill_cost": "1.5,0.02"}).start()
    try:
        workers = cluster.stub().ListWorkers(scheduler_pb2.ListWorkersRequest()).workers
        assert len(workers) == 2
        costs = cluster.app.orchestrator._registry.costs
        for w in workers:
            assert (w.prefill_base_ms, w.prefill_ms_per_token) == (1.5, 0.02)
            assert costs[w.worker_id] == CostModel(1.5, 0.02)
        cluster.wait_no_leaks()
    finally:
        cluster.stop()


@pytest.mark.parametrize("bad", ["1", "a,b", "1,2,3", "-1,0.1", "0,0", "nan,1", "1,inf"])
def test_a_malformed_prefill_cost_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="prefill_cost"):
        from_env(WorkerConfig, {"DISAGG_PREFILL_COST": bad})
