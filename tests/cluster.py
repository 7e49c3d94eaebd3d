"""An in-process cluster for tests: real gRPC on loopback, real Valkey, real engines.

The scheduler and the workers run on one asyncio loop in a background thread,
each with its own gRPC server on a free port, exactly as in their processes;
tests talk to them over gRPC and read the engines' pool counters directly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import grpc

from disagg.engine.config import EngineConfig
from disagg.metastore.store import MetaStore
from disagg.runtime.config import SchedulerConfig, WorkerConfig
from disagg.v1 import scheduler_pb2, scheduler_pb2_grpc
from disagg.worker.host import WorkerHost
from services.decode.main import make_host as make_decode
from services.prefill.main import make_host as make_prefill
from services.scheduler.main import SchedulerApp


class Cluster:
    def __init__(
        self,
        model: str,
        redis_url: str,
        prefill: int = 1,
        decode: int = 1,
        engine: dict[str, Any] | None = None,
        worker: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ):
        self.credentials = credentials  # the test client's (TLS clusters)
        self.redis_url = redis_url
        eng = EngineConfig(model=model, **{"num_blocks": 256, **(engine or {})})
        beats = {"heartbeat_s": 0.2, "heartbeat_ttl_s": 1.0}  # overridable through worker
        base = WorkerConfig(redis_url=redis_url, engine=eng, **{**beats, **(worker or {})})
        self.prefill_hosts = [
            make_prefill(dataclasses.replace(base, role="prefill")) for _ in range(prefill)
        ]
        self.decode_hosts = [
            make_decode(dataclasses.replace(base, role="decode")) for _ in range(decode)
        ]
        sched = {"port": 0, "http_port": -1, "registry_refresh_s": 0.1, **(scheduler or {})}
        self.app = SchedulerApp(SchedulerConfig(redis_url=redis_url, model=model, **sched))
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._tasks: list[asyncio.Future[None]] = []

    @property
    def hosts(self) -> list[WorkerHost]:
        return [*self.prefill_hosts, *self.decode_hosts]

    def start(self, timeout_s: float = 120.0) -> Cluster:
        self._thread.start()
        for host in self.hosts:
            self._tasks.append(asyncio.run_coroutine_threadsafe(host.run(), self._loop))  # type: ignore[arg-type]
        self._wait(lambda: all(h.address for h in self.hosts), timeout_s, "workers")
        ready = asyncio.Event()
        self._tasks.append(asyncio.run_coroutine_threadsafe(self.app.run(ready), self._loop))  # type: ignore[arg-type]
        self._wait(lambda: self.app.port != 0, timeout_s, "scheduler")
        want = len(self.hosts)
        self._wait(
            lambda: (
                len(self.stub().ListWorkers(scheduler_pb2.ListWorkersRequest()).workers) >= want
            ),
            timeout_s,
            "registry",
        )
        return self

    def _wait(self, cond: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            for t in self._tasks:
                if t.done():
                    t.result()  # raises the service's error
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not ready after {timeout_s}s")
            time.sleep(0.05)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    def stub(self) -> scheduler_pb2_grpc.SchedulerStub:
        if not hasattr(self, "_channel"):
            self._channel = (
                grpc.insecure_channel(self.address)
                if self.credentials is None
                else grpc.secure_channel(self.address, self.credentials)
            )
        return scheduler_pb2_grpc.SchedulerStub(self._channel)

    def generate(self, **fields: Any) -> tuple[list[int], str, scheduler_pb2.GenerateResponse]:
        """(token_ids, text, last response) of one streamed Generate."""
        ids: list[int] = []
        text = ""
        last = None
        for resp in self.stub().Generate(scheduler_pb2.GenerateRequest(**fields)):
            ids.extend(resp.token_ids)
            text += resp.text
            last = resp
        assert last is not None and last.finish_reason
        return ids, text, last

    def run(self, coro: Any, timeout_s: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def kv_keys(self) -> int:
        async def count() -> int:
            store = MetaStore(self.redis_url)
            try:
                return await store.count_kv_keys()
            finally:
                await store.close()

        return int(self.run(count()))

    def wait_no_leaks(self, timeout_s: float = 5.0) -> None:
        """Every pool full again, nothing held, no KV key in Redis (waits for async frees)."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = [h.engine.stats() for h in self.hosts if h.engine is not None]
            leaks = [
                s
                for s in stats
                if s.free_blocks != s.total_blocks or s.held or s.running or s.waiting
            ]
            keys = self.kv_keys()
            if not leaks and keys == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"leak: pools={stats} kv_keys={keys}")
            time.sleep(0.05)

    def stop(self) -> None:
        if hasattr(self, "_channel"):
            self._channel.close()
        self._loop.call_soon_threadsafe(self.app.request_stop)
        for h in self.hosts:
            self._loop.call_soon_threadsafe(h.request_stop)
        for t in self._tasks:
            try:
                t.result(timeout=30)
            except concurrent.futures.TimeoutError:  # a service's stop hangs: say where
                lines = [f"a service did not stop within 30 s: {t}"]
                for task in asyncio.all_tasks(self._loop):
                    try:  # a diagnostic: never what fails the test (grpc's frames lack lines)
                        lines.append(repr(task))
                        for frame in task.get_stack():
                            c = frame.f_code
                            lines.append(f"  {c.co_filename}:{frame.f_lineno} {c.co_name}")
                    except Exception as e:
                        lines.append(f"  (stack not read: {e!r})")
                print("\n".join(lines), file=sys.stderr)
                # in the run's warnings summary too: a passing test's stderr is not shown
                warnings.warn("\n".join(lines), RuntimeWarning, stacklevel=1)
            except Exception:
                pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
