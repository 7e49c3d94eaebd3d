"""Identifiers: request ids and worker ids.

Both are safe as Redis key components (no spaces or glob characters; see
disagg.metastore.keys.check_id).
"""

from __future__ import annotations

import os
import secrets
import socket
import uuid


def new_request_id() -> str:
    """A random 32-hex-digit id (uuid4)."""
    return uuid.uuid4().hex


def default_worker_id(role: str) -> str:
    """``<role>-<hostname>-<pid>-<4 random hex>``: unique even when a pid is reused."""
    host = "".join(c if c.isalnum() or c in "-._" else "-" for c in socket.gethostname())
    return f"{role}-{host or 'host'}-{os.getpid()}-{secrets.token_hex(2)}"
