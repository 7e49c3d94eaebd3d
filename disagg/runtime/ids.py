"""Identifiers: request ids (internal and client-chosen) and worker ids.

Two kinds of request id (docs/adr/0008):

- the *internal* id, ``new_request_id()``: made by the scheduler for every
  request it admits; the only key a request has inside the cluster (worker
  calls, the engines, Redis, the logs). Nobody outside chooses it, so two
  clients can never name the same request.
- the *client* id: whatever a client put in ``request_id``; only echoed back
  in its own responses, never a key. Bounded (``CLIENT_ID_MAX_LEN``) and of a
  charset (``CLIENT_ID_CHARS``) that cannot forge a key=value log field.

Internal and worker ids are safe as Redis key components (no spaces or glob
characters; see disagg.metastore.keys.check_id).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import uuid

CLIENT_ID_MAX_LEN = 128
CLIENT_ID_CHARS = "A-Z a-z 0-9 . _ : -"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]+")


def new_request_id() -> str:
    """A random 32-hex-digit id (uuid4): the internal id of one request."""
    return uuid.uuid4().hex


def client_id_error(value: str) -> str | None:
    """Why ``value`` is not an acceptable client request id; None when it is ("" too)."""
    if len(value) > CLIENT_ID_MAX_LEN:
        return f"at most {CLIENT_ID_MAX_LEN} characters, got {len(value)}"
    if value and _CLIENT_ID.fullmatch(value) is None:
        return f"only the characters {CLIENT_ID_CHARS} are allowed"
    return None


def default_worker_id(role: str) -> str:
    """``<role>-<hostname>-<pid>-<4 random hex>``: unique even when a pid is reused."""
    host = "".join(c if c.isalnum() or c in "-._" else "-" for c in socket.gethostname())
    return f"{role}-{host or 'host'}-{os.getpid()}-{secrets.token_hex(2)}"
