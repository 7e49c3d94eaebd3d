"""``Client``: the blocking client of the Scheduler service, one channel for all calls.

    with Client("127.0.0.1:50051") as client:
        for ev in client.generate("Once upon a time", max_tokens=20, temperature=0):
            print(ev.text, end="")

Lifecycle of a ``generate()`` stream:
1. Nothing is sent until the first ``next()``.
2. A try fails with a retryable status (UNAVAILABLE, RESOURCE_EXHAUSTED)
   before any response: wait (the server's hint, or a jittered backoff), try
   again, as ``RetryPolicy`` allows and the deadline leaves time for.
3. Events arrive as the server streams them; the last has ``finish_reason``.
4. ``close()`` (or leaving a ``with`` block, or dropping the stream) cancels
   the RPC: the server cancels the request and frees its KV on every worker.
Errors are ``ClientError`` subclasses (disagg.client.errors).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from disagg.client.config import DEFAULT_ADDRESS, resolve
from disagg.client.errors import ClientError, from_rpc_error, make_error
from disagg.client.request import build_request
from disagg.client.retry import RetryPolicy
from disagg.client.types import (
    Collector,
    Completion,
    GenerateEvent,
    Health,
    WorkerInfo,
    event_from_pb,
    worker_from_pb,
)
from disagg.runtime.tls import TlsFiles
from disagg.v1 import scheduler_pb2, scheduler_pb2_grpc

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from disagg.client.request import GenerateOptions

log = logging.getLogger("disagg.client")

OnRetry = Callable[[int, ClientError, float], None]  # (failed tries, error, seconds to wait)


class Deadline:
    """The time left of a call that started now with this timeout (None: no deadline)."""

    def __init__(self, timeout_s: float | None):
        self._end = None if timeout_s is None else time.monotonic() + timeout_s

    def left(self) -> float | None:
        """Seconds left; raises DeadlineExceeded when none are."""
        if self._end is None:
            return None
        left = self._end - time.monotonic()
        if left <= 0:
            raise make_error(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before a try")
        return left


def retry_wait(
    policy: RetryPolicy,
    attempt: int,
    error: ClientError,
    deadline: Deadline,
    on_retry: OnRetry | None,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before another try; raises error when there is to be none."""
    try:
        left = deadline.left()
    except ClientError:
        raise error from None
    wait = policy.next_wait(attempt, error, left, rand)
    if wait is None:
        raise error
    log.debug("retrying in %.2fs after try %d failed: %s", wait, attempt, error)
    if on_retry is not None:
        on_retry(attempt, error, wait)
    return wait


class GenerateStream:
    """Iterator of GenerateEvent; close() cancels the RPC (a with block closes it).

    ``cancel()`` may be called from another thread while one iterates: the
    iterating thread then gets ``Cancelled``."""

    def __init__(self, events: Callable[[GenerateStream], Iterator[GenerateEvent]]):
        self.call: grpc.Call | None = None  # the try in flight (set by the event generator)
        self._events = events(self)

    def __iter__(self) -> GenerateStream:
        return self

    def __next__(self) -> GenerateEvent:
        return next(self._events)

    def close(self) -> None:
        close: Any = getattr(self._events, "close", None)
        if close is not None:
            close()

    def cancel(self) -> None:
        call = self.call
        if call is not None:
            call.cancel()

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Client:
    """Blocking client of disagg.v1.Scheduler (and grpc.health.v1) at one address.

    api_key / tls: None reads DISAGG_API_KEY / DISAGG_TLS_* (pass "" / TlsFiles() for
    none); credentials overrides tls (e.g. grpc.ssl_channel_credentials() for the
    system's roots). timeout: default seconds per call, retries included (None: none).
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        api_key: str | None = None,
        tls: TlsFiles | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str = "",
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        on_retry: OnRetry | None = None,
    ):
        self._conn = resolve(address, api_key, tls, credentials, server_name)
        self._timeout = timeout
        self._retry = retry or RetryPolicy()
        self._on_retry = on_retry
        self._channel = self._conn.sync_channel()
        self._stub = scheduler_pb2_grpc.SchedulerStub(self._channel)

    @property
    def address(self) -> str:
        return self._conn.address

    def generate(
        self, prompt: str | None = None, **options: Unpack[GenerateOptions]
    ) -> GenerateStream:
        """Streams one completion; options as disagg.v1.GenerateRequest, plus timeout."""
        timeout = options.pop("timeout", None)
        req = build_request(prompt, options)
        deadline = Deadline(self._timeout if timeout is None else timeout)
        return GenerateStream(lambda stream: self._events(stream, req, deadline))

    def complete(self, prompt: str | None = None, **options: Unpack[GenerateOptions]) -> Completion:
        """generate() collected: the whole text, token ids, finish reason, usage, timings."""
        with self.generate(prompt, **options) as stream:
            return Collector().add_all(stream)

    def list_workers(self, *, timeout: float | None = None) -> list[WorkerInfo]:
        resp = self._unary(
            lambda left: self._stub.ListWorkers(
                scheduler_pb2.ListWorkersRequest(), timeout=left, metadata=self._conn.metadata
            ),
            timeout,
        )
        return [worker_from_pb(w) for w in resp.workers]

    def health(self, service: str = "", *, timeout: float | None = None) -> Health:
        """The server's grpc.health.v1 status ('' = the server as a whole)."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        resp = self._unary(
            lambda left: stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=left),
            timeout,
        )
        return Health(service, health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _events(
        self, stream: GenerateStream, req: scheduler_pb2.GenerateRequest, deadline: Deadline
    ) -> Iterator[GenerateEvent]:
        attempt = 0
        while True:
            attempt += 1
            call = self._stub.Generate(req, timeout=deadline.left(), metadata=self._conn.metadata)
            stream.call = call
            received = False
            try:
                for resp in call:
                    received = True
                    yield event_from_pb(resp)
                return
            except grpc.RpcError as e:
                error = from_rpc_error(e)
                if received:
                    raise error from None
                wait = retry_wait(self._retry, attempt, error, deadline, self._on_retry)
            finally:
                call.cancel()  # a no-op once the call is done
            time.sleep(wait)

    def _unary(self, call: Callable[[float | None], Any], timeout: float | None) -> Any:
        deadline = Deadline(self._timeout if timeout is None else timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                return call(deadline.left())
            except grpc.RpcError as e:
                error = from_rpc_error(e)
                time.sleep(retry_wait(self._retry, attempt, error, deadline, self._on_retry))
