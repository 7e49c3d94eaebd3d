"""The cluster credential: only the deployment's own processes may call worker methods.

Three kinds of caller, three credentials (docs/adr/0008): clients hold the API
key, which opens the scheduler's methods only; schedulers and workers hold the
cluster token -- and, under mTLS, a certificate naming a cluster role --, which
every worker method requires; nobody else holds either.

1. Every process of one deployment gets the same token through the
   environment (``DISAGG_CLUSTER_TOKEN``; ``disagg up`` makes a fresh random one
   per run when none is configured), never through argv or logs.
2. Worker servers install ``require_token``. Before the method body of a
   protected service runs:
   a. under mTLS (``peer_uris`` given, see ``tls.required_peer_uris``), the
      peer's certificate must carry one of those URI SANs (a scheduler's or a
      worker's identity), else PERMISSION_DENIED: a client certificate from the
      same CA authenticates its holder, but not as a member of the cluster;
   b. the call must carry ``x-disagg-cluster-token: <token>`` metadata,
      compared in constant time, else UNAUTHENTICATED.
   A refused call's request is never parsed. Health and reflection stay open
   (probes, grpcurl ``list``).
3. Callers of worker methods (the scheduler, a decode worker pulling KV) open
   their worker channels with ``send_token``, which adds the metadata to every
   call, and present their own certificate (``tls.channel_credentials``).
An empty token turns the token check off (a worker run alone for debugging),
and the worker says so in its log at startup.
"""

from __future__ import annotations

import hmac
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import grpc

TOKEN_METADATA = "x-disagg-cluster-token"
ENV = "DISAGG_CLUSTER_TOKEN"
PEER_URI_PROPERTY = "peer_uri"  # grpc auth context: the URI SANs of the peer's certificate

Check = Callable[[grpc.aio.ServicerContext], Awaitable[None]]  # aborts the call to refuse it


def _guard(handler: grpc.RpcMethodHandler, check: Check, parse: bool) -> grpc.RpcMethodHandler:
    """handler whose behaviour awaits check(context) first; parse False: the request is
    not even deserialized (the call is refused whatever check says)."""
    des = handler.request_deserializer if parse else None
    ser = handler.response_serializer
    if handler.unary_unary is not None or handler.stream_unary is not None:
        inner = handler.unary_unary or handler.stream_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(context)
            return await inner(request, context)

        make = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary is not None
            else grpc.stream_unary_rpc_method_handler
        )
        return make(unary, request_deserializer=des, response_serializer=ser)
    inner_stream = handler.unary_stream or handler.stream_stream

    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await check(context)
        result = inner_stream(request, context)
        if inspect.isasyncgen(result):
            async for response in result:
                yield response
        else:  # a coroutine that writes through context.write
            await result

    make_stream = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream is not None
        else grpc.stream_stream_rpc_method_handler
    )
    return make_stream(stream, request_deserializer=des, response_serializer=ser)


class require_token(grpc.aio.ServerInterceptor):
    """Server interceptor: methods of ``services`` need the cluster token and, when
    ``peer_uris`` is given (mTLS), a peer certificate with one of those URI SANs."""

    def __init__(self, token: str, services: Collection[str], peer_uris: Collection[str] = ()):
        self._token = token.encode()
        self._prefixes = tuple(f"/{s}/" for s in services)
        self._peer_uris = frozenset(u.encode() for u in peer_uris)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method or ""
        handler = await continuation(details)
        if handler is None or not method.startswith(self._prefixes):
            return handler
        if not self._token and not self._peer_uris:
            return handler
        sent = dict(details.invocation_metadata or ()).get(TOKEN_METADATA, "")
        token_ok = not self._token or hmac.compare_digest(str(sent).encode(), self._token)

        async def check(context: grpc.aio.ServicerContext) -> None:
            if self._peer_uris and not self._peer_uris.intersection(
                context.auth_context().get(PEER_URI_PROPERTY, ())
            ):
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{method}: the peer certificate names no cluster role (a URI SAN of "
                    f"{' or '.join(sorted(u.decode() for u in self._peer_uris))}); "
                    "worker methods are internal",
                )
            if not token_ok:
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"{method}: a cluster credential is required (worker methods are internal)",
                )

        return _guard(handler, check, parse=token_ok)


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


class _StreamStream(_Token, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(self._with_token(details), request_iterator)


def send_token(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors adding the cluster token to every call ([] when empty)."""
    return [_UnaryUnary(token), _UnaryStream(token), _StreamStream(token)] if token else []
