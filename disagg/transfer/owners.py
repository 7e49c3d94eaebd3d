"""Which owners a decode worker pulls KV from: the prefill workers registered in Redis.

A handle names its owner (worker id, address), and whoever calls Decode writes
the handle. Dialing whatever address it names would make the decode worker a
client of any host it can reach (SSRF) and let KV come from outside the
deployment. So before any connection, the owner must be a prefill worker of
this deployment's registry (``MetaStore.list_workers``, under the store's
namespace) with that worker id at that address; else ``ForeignOwner``.

1. An owner in the last listing passes at once: the data path does not wait
   on Redis. A listing older than ``max_age_s`` is renewed in the background.
2. An owner not in it: the listing is renewed now -- one listing for all the
   misses at that moment, at most one every ``min_refresh_s``, waited for at
   most ``wait_s`` -- and the owner looked up again; still absent: refused.
3. Redis unreachable (or slow): the last listing stands, since its owners were
   registered; an owner never listed is refused. Shortly after (``outage_grace_s``,
   as the scheduler's registry does), owners whose records expired meanwhile stay
   listed: their heartbeats could not land either, the scheduler still routes to
   them, and refusing them would only turn their handoffs into local prefills.
Does not connect to any owner, and does not change the registry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from disagg.metastore.store import OUTAGE_GRACE_S, MetaStore
from disagg.transfer.errors import TransferError
from disagg.transfer.handle import Handle
from disagg.v1 import common_pb2

log = logging.getLogger(__name__)

ListOwners = Callable[[], Awaitable[Sequence[common_pb2.WorkerInfo]]]


class ForeignOwner(TransferError):
    """The handle's owner is not a registered prefill worker: nothing was dialed."""


def prefill_workers(store: MetaStore) -> ListOwners:
    """The registered prefill workers of store's deployment."""
    return lambda: store.list_workers(common_pb2.WORKER_ROLE_PREFILL)


class RegisteredOwners:
    def __init__(
        self,
        list_owners: ListOwners,
        *,
        max_age_s: float = 1.0,
        min_refresh_s: float = 0.1,
        wait_s: float = 0.5,
        outage_grace_s: float = OUTAGE_GRACE_S,
    ):
        """list_owners: the registered prefill workers (``prefill_workers(store)``)."""
        self._list = list_owners
        self._max_age_s = max_age_s
        self._min_refresh_s = min_refresh_s
        self._wait_s = wait_s
        self._outage_grace_s = outage_grace_s
        self._failed_at: float | None = None  # when a listing last failed
        self._owners: frozenset[tuple[str, str]] = frozenset()  # (address, worker id)
        self._listed_at = float("-inf")  # start of the last listing that succeeded
        self._tried_at = float("-inf")  # start of the last listing
        self._listing: asyncio.Task[None] | None = None
        self._healthy = True  # the last listing succeeded (a failure is logged once)

    async def check(self, handle: Handle) -> None:
        """Returns if handle's owner is registered; raises ForeignOwner otherwise."""
        if self._known(handle):
            if time.monotonic() - self._listed_at > self._max_age_s:
                self._renew()
            return
        fresh = time.monotonic() - self._tried_at < self._min_refresh_s
        if self._listing is not None or not fresh:
            await asyncio.wait({self._renew()}, timeout=self._wait_s)
            if self._known(handle):
                return
        raise ForeignOwner(
            f"KV owner {handle.owner_worker_id!r} at {handle.owner_address!r} is not a "
            "registered prefill worker of this deployment: not contacted"
        )

    def close(self) -> None:
        """Stops a listing in flight."""
        if self._listing is not None:
            self._listing.cancel()

    def _known(self, handle: Handle) -> bool:
        return (handle.owner_address, handle.owner_worker_id) in self._owners

    def _renew(self) -> asyncio.Task[None]:
        """The listing in flight, or a new one."""
        if self._listing is None:
            self._tried_at = time.monotonic()
            self._listing = asyncio.get_running_loop().create_task(self._relist(self._tried_at))
        return self._listing

    async def _relist(self, started: float) -> None:
        try:
            infos = await self._list()
        except Exception as e:  # Redis down or a bad reply: the last listing stands
            if self._healthy:
                log.warning("cannot list the prefill workers, keeping the last listing: %s", e)
            self._healthy = False
            self._failed_at = time.monotonic()
            return
        finally:
            self._listing = None
        owners = frozenset((i.address, i.worker_id) for i in infos)
        if self._failed_at is not None:
            if time.monotonic() - self._failed_at <= self._outage_grace_s:
                owners |= self._owners  # the owners last seen, through the outage
            else:
                self._failed_at = None
        self._owners = owners
        self._listed_at = started
        self._healthy = True
