"""Helpers of the HTTP tests: a Cluster whose gRPC calls carry the API key, scraping.

(Not in conftest.py: the tests import these by module path, ``tests.http.support``;
the folder has no __init__.py so that it never shadows the standard library's http.)
"""

from __future__ import annotations

import urllib.request
from typing import Any

import grpc

from disagg.metrics import scrape
from disagg.runtime.config import SchedulerConfig
from disagg.v1 import scheduler_pb2_grpc
from services.scheduler.main import SchedulerApp
from tests.cluster import Cluster

API_KEY = "test-key-123"
AUTH = (("authorization", f"Bearer {API_KEY}"),)
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}t7 {% endif %}"
)


class _Auth(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Adds the API key to every call's metadata."""

    def _with_key(self, details: Any) -> Any:
        md = [*(details.metadata or ()), *AUTH]
        return details._replace(metadata=md)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_key(details), request)


class HttpCluster(Cluster):
    """Cluster with HTTP on a free port and an API key, whose gRPC stub sends the key."""

    def __init__(self, model: str, redis_url: str, **kw: Any):
        super().__init__(model, redis_url, **kw)
        cfg = SchedulerConfig(
            port=0,
            http_port=0,
            redis_url=redis_url,
            model=model,
            registry_refresh_s=0.1,
            api_key=API_KEY,
        )
        self.app = SchedulerApp(cfg)  # Cluster's own turns HTTP off

    def stub(self) -> scheduler_pb2_grpc.SchedulerStub:
        if not hasattr(self, "_channel"):
            self._channel = grpc.intercept_channel(grpc.insecure_channel(self.address), _Auth())
        return scheduler_pb2_grpc.SchedulerStub(self._channel)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.app.http_port}"

    def metrics(self, port: int | None = None) -> scrape.Samples:
        url = f"http://127.0.0.1:{port}/metrics" if port else self.base_url + "/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return scrape.parse(resp.read().decode())
