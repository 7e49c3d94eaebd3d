"""Several API keys are several tenants: one never shares (or probes) another's prefix cache.

A scheduler with two keys (``--api-key key-a,key-b``), one prefill and one decode worker.
Tenant A sends a 160-token prefix twice: the second time its prefill worker serves the
prefix from cache (``cached_tokens`` 160). Tenant B then sends the same prefix: no cached
token (B cannot learn that A sent it), the output greedy-equal; B's own repeat is cached.
Over HTTP (the official ``openai`` client) likewise. With one key there is one tenant
and no salt; a wrong key is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import openai
import pytest

from disagg.kvpool.hashing import prompt_hashes
from disagg.metastore.embedded import EmbeddedValkey
from disagg.runtime.config import SchedulerConfig
from disagg.v1 import scheduler_pb2, scheduler_pb2_grpc
from services.scheduler.auth import bearer_ok, cache_salt
from services.scheduler.main import SchedulerApp
from tests.cluster import Cluster
from tests.faults.conftest import flush

KEYS = "key-a,key-b"
PREFIX = [(7 * i) % 500 + 3 for i in range(160)]  # 10 full blocks of 16


class _DefaultKey(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Sends key-a on calls that name no key (the cluster's own readiness checks)."""

    def _keyed(self, details: Any) -> Any:
        md = list(details.metadata or ())
        if not any(k == "authorization" for k, _ in md):
            md.append(("authorization", "Bearer key-a"))
        return details._replace(metadata=md)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._keyed(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._keyed(details), request)


class TwoTenants(Cluster):
    """Cluster whose scheduler has two API keys and HTTP on a free port."""

    def __init__(self, model: str, redis_url: str, **kw: object):
        super().__init__(model, redis_url, **kw)  # type: ignore[arg-type]
        self.app = SchedulerApp(
            SchedulerConfig(
                port=0, http_port=0, redis_url=redis_url, model=model, api_key=KEYS,
                registry_refresh_s=0.1,
            )
        )  # fmt: skip

    def stub(self) -> scheduler_pb2_grpc.SchedulerStub:
        if not hasattr(self, "_channel"):
            self._channel = grpc.intercept_channel(
                grpc.insecure_channel(self.address), _DefaultKey()
            )
        return scheduler_pb2_grpc.SchedulerStub(self._channel)

    def as_tenant(self, key: str, tail: list[int]) -> scheduler_pb2.GenerateResponse:
        ids: list[int] = []
        last = None
        req = scheduler_pb2.GenerateRequest(
            prompt_token_ids=[*PREFIX, *tail], max_tokens=6, temperature=0
        )
        for resp in self.stub().Generate(req, metadata=(("authorization", f"Bearer {key}"),)):
            ids.extend(resp.token_ids)
            last = resp
        assert last is not None and last.finish_reason
        self.last_ids = ids
        return last


@pytest.fixture(scope="module")
def tenants(tiny_model: str, valkey: EmbeddedValkey) -> Iterator[TwoTenants]:
    flush(valkey.url)
    c = TwoTenants(tiny_model, valkey.url, engine={"compile": False}).start()
    yield c
    c.stop()


def test_one_tenant_never_hits_another_tenants_prefix(tenants: TwoTenants, tiny_reference) -> None:  # type: ignore[no-untyped-def]
    assert tenants.as_tenant("key-a", [11, 12]).usage.cached_prompt_tokens == 0
    assert tenants.as_tenant("key-a", [13, 14]).usage.cached_prompt_tokens == 160  # A's cache
    b = tenants.as_tenant("key-b", [15, 16])
    assert b.usage.cached_prompt_tokens == 0  # A's blocks are invisible to B
    assert tenants.last_ids == tiny_reference([*PREFIX, 15, 16], 6)
    assert tenants.as_tenant("key-b", [17, 18]).usage.cached_prompt_tokens == 160  # B's own

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{tenants.app.http_port}/v1",
                           api_key="key-b", max_retries=0)  # fmt: skip
    model = client.models.list().data[0].id
    done = client.completions.create(model=model, prompt=[*PREFIX, 19, 20], max_tokens=4)
    assert done.usage.prompt_tokens_details.cached_tokens == 160  # type: ignore[union-attr]

    with pytest.raises(grpc.RpcError) as err:
        tenants.as_tenant("key-c", [21, 22])
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    tenants.wait_no_leaks()


def test_salts_per_key_and_none_for_one_key() -> None:
    a, b = cache_salt(KEYS, "Bearer key-a"), cache_salt(KEYS, "Bearer key-b")
    assert a and b and a != b and b"key-a" not in a  # a hash of the key, never the key
    assert cache_salt("only-key", "Bearer only-key") == b"" and cache_salt("", None) == b""
    assert bearer_ok("Bearer key-b", KEYS) and not bearer_ok("Bearer key-a,key-b", KEYS)
    assert prompt_hashes(PREFIX, 16, salt=a)[0] != prompt_hashes(PREFIX, 16)[0]
    assert prompt_hashes(PREFIX, 16, salt=a) != prompt_hashes(PREFIX, 16, salt=b)
