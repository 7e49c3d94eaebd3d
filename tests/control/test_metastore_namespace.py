"""Namespaces and Redis URLs: two deployments on one Valkey never see each other's keys;
URLs with passwords reach redis-py unchanged and are redacted wherever printed."""

from __future__ import annotations

import pytest
import redis
from redis.asyncio.connection import SSLConnection

from disagg.metastore import keys
from disagg.metastore.embedded import start_embedded_valkey
from disagg.metastore.store import MetaStore, MetaStoreUnavailable, redacted
from disagg.v1 import common_pb2

from .helpers import run_async
from .test_metastore_workers import DECODE, make_worker


def test_namespace_names_are_checked() -> None:
    assert keys.Keys("blue-1.a_b").kv("r1") == "blue-1.a_b:kv:r1"
    assert keys.Keys().worker("w") == keys.worker_key("w") == "disagg:worker:w"
    for bad in ("", "a:b", "a*", "a b", "x" * 65, "ns?"):
        with pytest.raises(ValueError, match="namespace"):
            keys.Keys(bad)
    with pytest.raises(ValueError):
        MetaStore("redis://127.0.0.1:1/0", namespace="a:kv")


def test_two_namespaces_on_one_valkey_are_disjoint(valkey_url: str) -> None:
    async def scenario() -> None:
        blue = MetaStore(valkey_url, namespace="blue")
        green = MetaStore(valkey_url, namespace="green")
        try:
            await blue.register_worker(make_worker("p0"), ttl_s=10)
            await green.register_worker(make_worker("p0", DECODE), ttl_s=10)  # the same id
            await blue.put_kv_handle(common_pb2.KvHandle(request_id="r1"), ttl_s=10)
            assert [(w.worker_id, w.role) for w in await blue.list_workers()] == [
                ("p0", common_pb2.WORKER_ROLE_PREFILL)
            ]
            assert [(w.worker_id, w.role) for w in await green.list_workers()] == [("p0", DECODE)]
            assert await green.count_kv_keys() == 0 and await green.get_kv_handle("r1") is None
            assert await blue.count_kv_keys() == 1
            await green.remove_worker("p0")
            assert len(await blue.list_workers()) == 1
        finally:
            await blue.close()
            await green.close()

    run_async(scenario())
    with redis.Redis.from_url(valkey_url) as r:
        assert {k.decode().split(":")[0] for k in r.scan_iter("*")} == {"blue"}


def test_password_urls_reach_redis_py_and_are_redacted() -> None:
    url = "rediss://:s3cr%3At@valkey.example:6380/2?ssl_ca_certs=/etc/ca.pem"
    store = MetaStore(url)
    pool = store._client.connection_pool
    assert pool.connection_class is SSLConnection
    kw = pool.connection_kwargs
    assert (kw["password"], kw["host"], kw["port"], kw["db"]) == (
        "s3cr:t",
        "valkey.example",
        6380,
        2,
    )
    assert kw["ssl_ca_certs"] == "/etc/ca.pem"
    assert redacted(url) == "rediss://:***@valkey.example:6380/2?ssl_ca_certs=/etc/ca.pem"
    assert redacted("redis://user:pw@[::1]:6379/0") == "redis://user:***@[::1]:6379/0"
    assert redacted("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    run_async(store.close())


def test_a_password_protected_valkey_refuses_without_it() -> None:
    with start_embedded_valkey(password="pw with spaces/and:colons") as server:
        assert "pw with spaces" not in server.url  # quoted in the URL

        async def scenario() -> None:
            good = MetaStore(server.url)
            bad = MetaStore(f"redis://{server.host}:{server.port}/0", timeout_s=1.0, retries=0)
            try:
                await good.register_worker(make_worker("p0"), ttl_s=10)
                assert [w.worker_id for w in await good.list_workers()] == ["p0"]
                with pytest.raises(MetaStoreUnavailable, match="AuthenticationError"):
                    await bad.list_workers()
            finally:
                await good.close()
                await bad.close()

        run_async(scenario())
