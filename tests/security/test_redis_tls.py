"""``rediss://`` with a password, end to end.

The bundled valkey-server is built without TLS ("Failed finding TLS support"
for ``--tls-port``), so TLS is terminated by a proxy in front of a Valkey with
``requirepass``: the cluster's URL is ``rediss://:PASSWORD@...?ssl_ca_certs=CA``,
passed to redis-py unchanged. A real scheduler and workers register, serve a
disaggregated generation and clean up through it; a client that does not trust
the server's CA, or has no password, gets nowhere.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from disagg.metastore.embedded import EmbeddedValkey, start_embedded_valkey
from disagg.metastore.store import MetaStore, MetaStoreUnavailable
from tests.cluster import Cluster
from tests.faults.pki import make_pki
from tests.security.redis_proxy import RedisProxy

PASSWORD = "tls-and-a-password"


@pytest.fixture()
def tls_valkey(tmp_path: Path) -> Iterator[tuple[RedisProxy, str, str]]:
    """(the TLS proxy, its CA file, a CA file it does not trust) in front of a locked Valkey."""
    pki = make_pki(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki.cert, pki.key)
    server: EmbeddedValkey = start_embedded_valkey(password=PASSWORD)
    try:
        with RedisProxy(server.port, ssl=ctx) as proxy:
            yield proxy, pki.ca, pki.rogue_ca
    finally:
        server.stop()


def test_a_cluster_over_rediss_with_a_password(
    tls_valkey: tuple[RedisProxy, str, str], tiny_model: str
) -> None:
    proxy, ca, rogue_ca = tls_valkey
    url = proxy.url(PASSWORD, scheme="rediss", query=f"ssl_ca_certs={ca}")

    async def refused(bad_url: str, why: str) -> None:
        store = MetaStore(bad_url, timeout_s=2.0, retries=0)
        try:
            with pytest.raises(MetaStoreUnavailable, match=why):
                await store.ping()
        finally:
            await store.close()

    asyncio.run(refused(proxy.url(PASSWORD, "rediss", f"ssl_ca_certs={rogue_ca}"), "CERTIFICATE"))
    asyncio.run(refused(proxy.url("", "rediss", f"ssl_ca_certs={ca}"), "Authentication"))
    asyncio.run(refused(proxy.url(PASSWORD), "Error|Connection"))  # plaintext to a TLS port

    cluster = Cluster(tiny_model, url, engine={"compile": False}).start()
    try:
        ids, _, last = cluster.generate(
            prompt_token_ids=list(range(3, 45)), max_tokens=6, temperature=0
        )
        assert len(ids) == 6
        assert last.prefill_worker.startswith("prefill-") and last.timings.kv_transfer_ms > 0
        cluster.wait_no_leaks()  # reads Redis through the same rediss:// URL
    finally:
        cluster.stop()
