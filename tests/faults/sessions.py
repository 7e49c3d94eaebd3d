"""A hand-driven worker session (DecodeSession, PrefillSession) over real gRPC:
write its messages, collect the updates per request as they come."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import grpc

_CODES = {c.value[0]: c for c in grpc.StatusCode}


class HandSession:
    """open_call(channel) -> the session call, e.g.
    ``lambda ch: worker_pb2_grpc.DecodeWorkerStub(ch).DecodeSession()``."""

    def __init__(self, address: str, open_call: Callable[[grpc.aio.Channel], Any]) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.call = open_call(self.channel)
        self.updates: dict[str, list[Any]] = defaultdict(list)
        self.ended: asyncio.Future[grpc.StatusCode] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for resp in self.call:
                for u in resp.updates:
                    self.updates[u.request_id].append(u)
            self.ended.set_result(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as e:
            self.ended.set_result(e.code())

    def error(self, rid: str) -> grpc.StatusCode | None:
        """The status that ended rid, if one did."""
        return next((_CODES[u.code] for u in self.updates[rid] if u.code), None)

    async def until(self, cond: Callable[[], Any], timeout_s: float = 20.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not cond():
            assert asyncio.get_running_loop().time() < deadline, dict(self.updates)
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self.channel.close()
