"""API-key checks for both front ends (constant-time; an empty key turns auth off).

HTTP: ``Authorization: Bearer KEY``. gRPC: metadata ``authorization: Bearer KEY``.
/health and /metrics (HTTP) and health/reflection (gRPC) stay open.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Any

OPEN_HTTP_PATHS = frozenset({"/health", "/metrics"})


def bearer_ok(header: str | None, api_key: str) -> bool:
    """True when auth is off or header is 'Bearer <api_key>'."""
    if not api_key:
        return True
    if not header:
        return False
    scheme, _, token = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), api_key.encode()
    )


def grpc_metadata_ok(metadata: Iterable[Any] | None, api_key: str) -> bool:
    """bearer_ok on the 'authorization' entry of a call's invocation metadata."""
    if not api_key:
        return True
    for key, value in metadata or ():
        if key.lower() == "authorization":
            return bearer_ok(
                value if isinstance(value, str) else value.decode(errors="replace"), api_key
            )
    return False
