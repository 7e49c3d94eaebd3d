"""Failed calls as exceptions: the gRPC status, the server's message, its retry hint.

Every error the client raises is a ``ClientError``; the common statuses have a
subclass each, so callers can ``except ResourceExhausted`` without comparing
codes. The retry hint is read where the scheduler puts it: the ``retry-after``
metadata key (seconds; trailing, else initial metadata), else the message's
"retry after 1.5s".
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import grpc

RETRY_AFTER_KEY = "retry-after"
_RETRY_IN_DETAILS = re.compile(r"retry after (\d+(?:\.\d+)?)s")


class ClientError(Exception):
    """A call that failed with a gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after_s: float | None = None):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.retry_after_s = retry_after_s  # the server's hint, seconds; None = none given


class InvalidArgument(ClientError):
    """The request is malformed or out of range; retrying it unchanged fails again."""


class ResourceExhausted(ClientError):
    """Refused at admission (overload, SLO); ``retry_after_s`` says when to try again."""


class Unavailable(ClientError):
    """No server or no worker could take the call now."""


class DeadlineExceeded(ClientError):
    """The call's deadline passed (retries included)."""


class Unauthenticated(ClientError):
    """Missing or wrong API key."""


class Cancelled(ClientError):
    """The call was cancelled."""


_BY_CODE: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.CANCELLED: Cancelled,
}


def make_error(
    code: grpc.StatusCode, details: str, retry_after_s: float | None = None
) -> ClientError:
    return _BY_CODE.get(code, ClientError)(code, details, retry_after_s)


def _metadata_hint(metadata: Iterable[Any] | None) -> float | None:
    for key, value in metadata or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(0.0, float(value))
            except (TypeError, ValueError):
                return None
    return None


def retry_hint(trailing: Any, initial: Any, details: str) -> float | None:
    """Seconds the server asks the client to wait, or None."""
    hint = _metadata_hint(trailing)
    if hint is None:
        hint = _metadata_hint(initial)
    if hint is None and (m := _RETRY_IN_DETAILS.search(details)):
        hint = float(m.group(1))
    return hint


def from_rpc_error(e: grpc.RpcError) -> ClientError:
    """A sync grpc.RpcError or a grpc.aio.AioRpcError as a ClientError."""
    call: Any = e  # both kinds carry the grpc.Call accessors
    code = call.code() or grpc.StatusCode.UNKNOWN
    details = call.details() or ""
    hint = retry_hint(call.trailing_metadata(), call.initial_metadata(), details)
    return make_error(code, details, hint)
