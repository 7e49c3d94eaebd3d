"""A TCP proxy in front of a Redis server that a test can turn into a black hole.

``forward()``: bytes flow both ways. ``blackhole()``: every connection, old
and new, is still accepted and read, but what clients send is swallowed and
nothing comes back -- not a refused or reset connection, a silent one, as when
a firewall drops the packets or the server hangs. ``forward()`` again heals
it: idle connections carry on, and those whose bytes were swallowed are reset
(their requests are lost, as after a failover), so their clients learn it at
once rather than at their own deadlines. With ``ssl`` the proxy terminates
TLS, so a ``rediss://`` client can reach a server built without it.

The proxy runs on its own event loop in a daemon thread, so it keeps its
behaviour whatever the code under test does to its own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl as ssl_lib
import threading
from types import TracebackType


class RedisProxy:
    def __init__(
        self,
        target_port: int,
        target_host: str = "127.0.0.1",
        ssl: ssl_lib.SSLContext | None = None,
    ) -> None:
        self._target = (target_host, target_port)
        self._ssl = ssl
        self._open = True
        self.swallowed = 0  # bytes clients sent while black-holed
        self.accepted = 0  # connections accepted, all modes
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._swallowing: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.port = 0

    def start(self) -> RedisProxy:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self._ssl))
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def url(self, password: str = "", scheme: str = "redis", query: str = "") -> str:
        auth = f":{password}@" if password else ""
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0" + (f"?{query}" if query else "")

    def blackhole(self) -> None:
        self._open = False

    def forward(self) -> None:
        async def reset() -> None:
            for pair in list(self._swallowing):
                for w in pair:
                    w.transport.abort()
            self._swallowing.clear()
            self._open = True

        self._call(reset())

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):  # the pipes see EOF and end
                w.close()
            await asyncio.wait(self._tasks, timeout=2) if self._tasks else None
            for task in list(self._tasks):
                task.cancel()

        with contextlib.suppress(Exception):
            self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> RedisProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _call(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            server_r, server_w = await asyncio.open_connection(*self._target)
        except OSError:
            client_w.close()
            self._tasks.discard(task)
            return
        self._writers |= {client_w, server_w}
        try:
            pair = (client_w, server_w)
            await asyncio.gather(
                self._pipe(client_r, server_w, pair),
                self._pipe(server_r, client_w, pair),
                return_exceptions=True,
            )
        finally:
            self._tasks.discard(task)
            self._swallowing.discard((client_w, server_w))
            for w in (client_w, server_w):
                self._writers.discard(w)
                w.close()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        from_client = writer is pair[1]
        try:
            while data := await reader.read(65536):
                if not self._open:
                    self.swallowed += len(data) if from_client else 0
                    self._swallowing.add(pair)
                    continue  # swallowed: nothing reaches the other side
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl_lib.SSLError):
            pass  # one side went away: the connection ends
        finally:
            writer.close()
