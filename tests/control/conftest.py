"""Fixtures for control-plane tests: a real embedded Valkey, no fakes.

pytest-asyncio is not a dependency: async test bodies run via
``helpers.run_async`` inside sync tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from disagg.metastore.embedded import EmbeddedValkey, start_embedded_valkey


@pytest.fixture(scope="session")
def shared_valkey() -> Iterator[EmbeddedValkey]:
    with start_embedded_valkey() as server:
        yield server


@pytest.fixture
def valkey_url(shared_valkey: EmbeddedValkey) -> str:
    """URL of an emptied shared server (tests must not stop it: see own_valkey)."""
    with redis.Redis.from_url(shared_valkey.url) as client:
        client.flushdb()
    return shared_valkey.url


@pytest.fixture
def own_valkey() -> Iterator[EmbeddedValkey]:
    """A server of this test alone, which it may stop and restart."""
    with start_embedded_valkey() as server:
        yield server
