from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from disagg.metastore.embedded import EmbeddedValkey
from tests.cluster import Cluster


def flush(url: str) -> None:
    with redis.Redis.from_url(url) as r:
        r.flushall()


@pytest.fixture()
def make_cluster(tiny_model: str, valkey: EmbeddedValkey) -> Iterator:  # type: ignore[type-arg]
    """make_cluster(**kw) -> a started Cluster on the tiny model; all stopped at teardown."""
    made: list[Cluster] = []

    def make(**kw: object) -> Cluster:
        flush(valkey.url)
        c = Cluster(tiny_model, kw.pop("redis_url", valkey.url), **kw).start()  # type: ignore[arg-type]
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop()
