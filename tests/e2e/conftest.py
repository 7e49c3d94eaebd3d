from __future__ import annotations

import pytest
import redis

from disagg.metastore.embedded import EmbeddedValkey


@pytest.fixture()
def fresh_redis(valkey: EmbeddedValkey) -> str:
    """The shared Valkey, emptied: no worker or KV key of an earlier test survives."""
    with redis.Redis.from_url(valkey.url) as r:
        r.flushall()
    return valkey.url
