"""Why a handoff did not happen: each error names who must act on it.

``TransferError`` and its subclasses are transfer failures: the receiver frees
its reservation and the caller falls back to a local prefill (or, on the owner's
side, the puller gets a clean status). ``DuplicateRequest`` is not a transfer
failure: the id belongs to another request here, whose KV must be left alone.
"""

from __future__ import annotations


class TransferError(RuntimeError):
    """A KV fetch failed or delivered malformed data; the receiver must discard it."""


class HandoffNotFound(TransferError):
    """The owner holds no READY KV under this id: expired, released or being pulled."""


class HandoffTaken(TransferError):
    """A PREFILLING handle already has its one reader."""


class TransferAborted(TransferError):
    """The owner's blocks were freed (released or expired) while they were being served."""


class OwnerUnreachable(TransferError):
    """The owner did not answer a release; it frees its blocks by lease, if it is alive."""


class ReadInFlight(TransferError):
    """A READ into the reserved blocks could not be stopped: they must not be reused."""


class DuplicateRequest(Exception):
    """The request id is already running or holds KV on this worker."""
