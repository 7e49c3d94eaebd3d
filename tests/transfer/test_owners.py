"""Which KV owners a decode worker contacts, against a registry listing that fails
and comes back: registered owners pass, unknown ones are refused, and owners whose
records expired during a Redis outage stay trusted for a short grace after it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from disagg.transfer.handle import Handle
from disagg.transfer.owners import ForeignOwner, RegisteredOwners
from disagg.v1 import common_pb2
from tests.transfer.support import mock_engine

LAYOUT = mock_engine().info.layout
A = common_pb2.WorkerInfo(worker_id="prefill-a", address="127.0.0.1:7001")
B = common_pb2.WorkerInfo(worker_id="prefill-b", address="127.0.0.1:7002")


def _handle(owner: common_pb2.WorkerInfo) -> Handle:
    return Handle("r", owner.worker_id, owner.address, (0,), 4, LAYOUT, 7)


class Registry:
    """The listing the owners check reads: a list of records, or an outage."""

    def __init__(self, *records: common_pb2.WorkerInfo) -> None:
        self.records: list[common_pb2.WorkerInfo] = list(records)
        self.down = False
        self.listings = 0

    async def list(self) -> Sequence[common_pb2.WorkerInfo]:
        self.listings += 1
        if self.down:
            raise ConnectionError("redis unreachable")
        return list(self.records)


async def _refused(owners: RegisteredOwners, owner: common_pb2.WorkerInfo) -> bool:
    try:
        await owners.check(_handle(owner))
    except ForeignOwner:
        return True
    return False


def test_owners_expired_during_an_outage_are_trusted_for_the_grace_only() -> None:
    async def scenario() -> None:
        reg = Registry(A)
        owners = RegisteredOwners(reg.list, max_age_s=0.0, min_refresh_s=0.0, outage_grace_s=0.3)
        assert not await _refused(owners, A)  # listed on the miss
        assert await _refused(owners, B)  # never registered
        a_id_at_b = common_pb2.WorkerInfo(worker_id=A.worker_id, address=B.address)
        assert await _refused(owners, a_id_at_b)  # a registered id at another address

        reg.down = True  # the outage: the last listing stands
        assert not await _refused(owners, A)
        await asyncio.sleep(0.01)  # the background renewal fails
        reg.down, reg.records = False, [B]  # back, A's record expired meanwhile, B new
        assert not await _refused(owners, B)  # the miss relists
        assert not await _refused(owners, A)  # within the grace: still trusted
        await asyncio.sleep(0.35)
        assert not await _refused(owners, A)  # passes on the old listing, renews it
        await asyncio.sleep(0.01)
        assert await _refused(owners, A)  # the grace is over: refused
        assert not await _refused(owners, B)

        reg.records = []  # without an outage a vanished owner is refused at once
        await owners.check(_handle(B))
        await asyncio.sleep(0.01)
        assert await _refused(owners, B)
        owners.close()

    asyncio.run(scenario())


def test_without_a_grace_an_owner_expired_during_the_outage_is_refused() -> None:
    async def scenario() -> None:
        reg = Registry(A)
        owners = RegisteredOwners(reg.list, max_age_s=0.0, min_refresh_s=0.0, outage_grace_s=0.0)
        await owners.check(_handle(A))
        reg.down = True
        await owners.check(_handle(A))
        await asyncio.sleep(0.01)
        reg.down, reg.records = False, []
        await owners.check(_handle(A))  # the last listing, renewed in the background
        await asyncio.sleep(0.01)
        assert await _refused(owners, A)
        owners.close()

    asyncio.run(scenario())
