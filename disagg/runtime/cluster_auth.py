"""The cluster credential: only the deployment's own processes may call worker methods.

Three kinds of caller, three credentials (docs/adr/0008): clients hold the API
key, which opens the scheduler's methods only; schedulers and workers hold the
cluster token, which every worker method requires; nobody else holds either.

1. Every process of one deployment gets the same token through the
   environment (``DISAGG_CLUSTER_TOKEN``; ``disagg up`` makes a fresh random one
   per run when none is configured), never through argv or logs.
2. Worker servers install ``require_token``: a call to a method of a protected
   service without ``x-disagg-cluster-token: <token>`` metadata fails
   UNAUTHENTICATED, compared in constant time, before the method body runs.
   Health and reflection stay open (probes, grpcurl ``list``).
3. Callers of worker methods (the scheduler, a decode worker pulling KV) open
   their worker channels with ``send_token``, which adds the metadata to every
   call.
An empty token turns the check off (a worker run alone for debugging), and the
worker says so in its log at startup.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Collection
from typing import Any

import grpc

TOKEN_METADATA = "x-disagg-cluster-token"
ENV = "DISAGG_CLUSTER_TOKEN"


def _deny(message: str) -> grpc.RpcMethodHandler:
    async def abort(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(abort)


def _deny_stream(message: str) -> grpc.RpcMethodHandler:
    async def abort(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - abort raises

    return grpc.unary_stream_rpc_method_handler(abort)


class require_token(grpc.aio.ServerInterceptor):
    """Server interceptor: methods of ``services`` need the cluster token."""

    def __init__(self, token: str, services: Collection[str]):
        self._token = token.encode()
        self._prefixes = tuple(f"/{s}/" for s in services)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method or ""
        if not self._token or not method.startswith(self._prefixes):
            return await continuation(details)
        sent = dict(details.invocation_metadata or ()).get(TOKEN_METADATA, "")
        if hmac.compare_digest(str(sent).encode(), self._token):
            return await continuation(details)
        handler = await continuation(details)
        why = f"{method}: a cluster credential is required (worker methods are internal)"
        if handler is not None and handler.response_streaming:
            return _deny_stream(why)
        return _deny(why)


class _Token:
    def __init__(self, token: str):
        self._metadata = ((TOKEN_METADATA, token),)

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), *self._metadata)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _UnaryUnary(_Token, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._with_token(details), request)


class _UnaryStream(_Token, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._with_token(details), request)


def send_token(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors adding the cluster token to every call ([] when empty)."""
    return [_UnaryUnary(token), _UnaryStream(token)] if token else []
