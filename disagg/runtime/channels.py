"""One grpc.aio channel per address, reused by every call to that address.

Opening a channel per request costs a TCP (and HTTP/2) handshake each time;
a channel multiplexes any number of concurrent RPCs. Channels carry the same
16 MiB message limits as the servers (see grpc_server.MAX_MESSAGE_BYTES).

The cache is bounded: at most ``max_channels`` open channels, least recently
used first out. An evicted channel is closed (its RPCs still running get
``evict_grace_s`` to finish), so a stream of distinct addresses -- a bug, or
addresses an attacker managed to name -- cannot pile up sockets and threads.
A cluster has far fewer workers than the bound, so eviction is the exception.

grpc.aio channels belong to the event loop they were created on. A
``ChannelCache`` is meant to live inside one loop; the module-level
``get_channel``/``close_all`` use a default cache that starts afresh when
called from a different loop than before (tests run several loops in turn).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence

import grpc

from disagg.runtime.grpc_server import MAX_MESSAGE_BYTES, message_size_options

MAX_CHANNELS = 256  # open channels per cache; the least recently used one is closed first
EVICT_GRACE_S = 30.0  # RPCs still running on an evicted channel get this long to finish


class ChannelCache:
    """address ("host:port") -> open channel (TLS when credentials are given), LRU-bounded."""

    def __init__(
        self,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
        *,
        max_channels: int = MAX_CHANNELS,
        evict_grace_s: float = EVICT_GRACE_S,
    ) -> None:
        """interceptors: on every channel (e.g. ``cluster_auth.send_token``)."""
        if max_channels < 1:
            raise ValueError(f"max_channels must be >= 1, got {max_channels}")
        self._options = message_size_options(max_message_bytes)
        self._credentials = credentials
        self._interceptors = list(interceptors) or None
        self._max = max_channels
        self._grace_s = evict_grace_s
        self._channels: OrderedDict[str, grpc.aio.Channel] = OrderedDict()
        self._closing: set[asyncio.Task[None]] = set()  # evicted channels being closed
        self.evicted = 0  # channels closed to stay within max_channels

    def get_channel(self, address: str) -> grpc.aio.Channel:
        """The channel to address, opened if needed (call on the cache's event loop)."""
        channel = self._channels.get(address)
        if channel is not None:
            self._channels.move_to_end(address)
            return channel
        channel = self._open(address)
        self._channels[address] = channel
        while len(self._channels) > self._max:
            _, oldest = self._channels.popitem(last=False)
            self._evict(oldest)
        return channel

    def _open(self, address: str) -> grpc.aio.Channel:
        if self._credentials is None:
            return grpc.aio.insecure_channel(
                address, options=self._options, interceptors=self._interceptors
            )
        return grpc.aio.secure_channel(
            address, self._credentials, options=self._options, interceptors=self._interceptors
        )

    def _evict(self, channel: grpc.aio.Channel) -> None:
        self.evicted += 1
        task = asyncio.get_running_loop().create_task(channel.close(self._grace_s))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self, address: str, grace_s: float | None = None) -> None:
        """Closes the channel of address (e.g. a worker that left the registry)."""
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close(grace_s)

    async def close_all(self, grace_s: float | None = None) -> None:
        """Closes every channel; then waits for the evicted ones still in their grace."""
        channels, self._channels = list(self._channels.values()), OrderedDict()
        for channel in channels:
            await channel.close(grace_s)
        await asyncio.gather(*self._closing, return_exceptions=True)

    def __contains__(self, address: str) -> bool:
        return address in self._channels

    def __len__(self) -> int:
        return len(self._channels)


_default: ChannelCache | None = None
_default_loop: asyncio.AbstractEventLoop | None = None


def _default_cache() -> ChannelCache:
    global _default, _default_loop
    loop = asyncio.get_running_loop()
    if _default is None or _default_loop is not loop:
        _default, _default_loop = ChannelCache(), loop  # channels of a dead loop are unusable
    return _default


def get_channel(address: str) -> grpc.aio.Channel:
    """The shared channel to address on the running loop."""
    return _default_cache().get_channel(address)


async def close_all(grace_s: float | None = None) -> None:
    await _default_cache().close_all(grace_s)
