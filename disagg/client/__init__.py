"""disagg.client: typed Python clients of the Scheduler gRPC service.

- ``Client`` (blocking) and ``AsyncClient`` (asyncio): ``generate()`` streams
  ``GenerateEvent``s, ``complete()`` collects them into a ``Completion``,
  ``list_workers()``, ``health()``. One channel per client, reused by every
  call; deadlines per call; closing a stream cancels its RPC; UNAVAILABLE and
  RESOURCE_EXHAUSTED retried before the first token (the server's retry hint,
  else a jittered backoff: ``RetryPolicy``); API key and TLS/mTLS from the
  arguments or the ``DISAGG_API_KEY`` / ``DISAGG_TLS_*`` variables.
- Errors: ``ClientError`` and a subclass per common status.

    from disagg.client import Client

    with Client("127.0.0.1:50051") as client:
        print(client.complete("The capital of France is", max_tokens=8, temperature=0).text)
"""

from disagg.client.aio import AsyncClient, AsyncGenerateStream
from disagg.client.config import ClientConfig
from disagg.client.errors import (
    Cancelled,
    ClientError,
    DeadlineExceeded,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from disagg.client.request import GenerateOptions
from disagg.client.retry import NO_RETRY, RetryPolicy
from disagg.client.sync import Client, GenerateStream
from disagg.client.types import Completion, GenerateEvent, Health, Timings, Usage, WorkerInfo

__all__ = [
    "NO_RETRY",
    "AsyncClient",
    "AsyncGenerateStream",
    "Cancelled",
    "Client",
    "ClientConfig",
    "ClientError",
    "Completion",
    "DeadlineExceeded",
    "GenerateEvent",
    "GenerateOptions",
    "GenerateStream",
    "Health",
    "InvalidArgument",
    "ResourceExhausted",
    "RetryPolicy",
    "Timings",
    "Unauthenticated",
    "Unavailable",
    "Usage",
    "WorkerInfo",
]
