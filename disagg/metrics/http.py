"""/metrics over aiohttp: a route for an existing app, or a server of its own (workers)."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


def metrics_handler(registry: CollectorRegistry):  # type: ignore[no-untyped-def]
    async def handle(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    return handle


class MetricsServer:
    """GET /metrics on host:port (0 = a free port; ``port`` is the bound one after start)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        self._registry = registry
        self._host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        app = web.Application()
        app.router.add_get("/metrics", metrics_handler(self._registry))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self.port)
        await site.start()
        self.port = bound_port(self._runner)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def bound_port(runner: web.AppRunner) -> int:
    """The port the runner's first site listens on."""
    return int(runner.addresses[0][1])
