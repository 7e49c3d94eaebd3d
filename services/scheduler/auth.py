"""API-key checks for both front ends (constant-time; an empty key turns auth off).

HTTP: ``Authorization: Bearer KEY``. gRPC: metadata ``authorization: Bearer KEY``.
/health and /metrics (HTTP) and health/reflection (gRPC) stay open.

Several keys (``--api-key k1,k2``, one per tenant) are each accepted, and each
gets its own prefix-cache salt (``cache_salt``): prompts of different keys never
share a cached block, so one tenant cannot tell from ``cached_tokens`` (or from
timing) whether another sent a prefix. With one key there is one tenant: no salt.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import Any

OPEN_HTTP_PATHS = frozenset({"/health", "/metrics"})


def api_keys(api_key: str) -> tuple[str, ...]:
    """The configured keys: ``api_key`` split at commas (none: auth is off)."""
    return tuple(k for k in (part.strip() for part in api_key.split(",")) if k)


def _token(header: str | None) -> str | None:
    scheme, _, token = (header or "").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def bearer_ok(header: str | None, api_key: str) -> bool:
    """True when auth is off or header is 'Bearer <one of the keys>'."""
    keys = api_keys(api_key)
    if not keys:
        return True
    token = _token(header)
    if token is None:
        return False
    ok = False
    for key in keys:  # every key compared, in constant time each: no early exit
        ok |= hmac.compare_digest(token.encode(), key.encode())
    return ok


def cache_salt(api_key: str, header: str | None) -> bytes:
    """The prefix-cache salt of the (authenticated) caller: a hash of its key when several
    keys are configured, else b"" (one tenant). The key itself never leaves the scheduler."""
    if len(api_keys(api_key)) < 2:
        return b""
    token = (_token(header) or "").encode()
    return hashlib.blake2b(token, digest_size=16, person=b"disagg-tenant").digest()


def grpc_authorization(metadata: Iterable[Any] | None) -> str | None:
    """The 'authorization' entry of a call's invocation metadata."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


def grpc_metadata_ok(metadata: Iterable[Any] | None, api_key: str) -> bool:
    """bearer_ok on the 'authorization' entry of a call's invocation metadata."""
    if not api_keys(api_key):
        return True
    header = grpc_authorization(metadata)
    return header is not None and bearer_ok(header, api_key)
