"""One grpc.aio channel per address, reused by every call to that address.

Opening a channel per request costs a TCP (and HTTP/2) handshake each time;
a channel multiplexes any number of concurrent RPCs. Channels carry the same
16 MiB message limits as the servers (see grpc_server.MAX_MESSAGE_BYTES).

grpc.aio channels belong to the event loop they were created on. A
``ChannelCache`` is meant to live inside one loop; the module-level
``get_channel``/``close_all`` use a default cache that starts afresh when
called from a different loop than before (tests run several loops in turn).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc

from disagg.runtime.grpc_server import MAX_MESSAGE_BYTES, message_size_options


class ChannelCache:
    """address ("host:port") -> open channel (TLS when credentials are given)."""

    def __init__(
        self,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        """interceptors: on every channel (e.g. ``cluster_auth.send_token``)."""
        self._options = message_size_options(max_message_bytes)
        self._credentials = credentials
        self._interceptors = list(interceptors) or None
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get_channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(
                    address, options=self._options, interceptors=self._interceptors
                )
            else:
                channel = grpc.aio.secure_channel(
                    address,
                    self._credentials,
                    options=self._options,
                    interceptors=self._interceptors,
                )
            self._channels[address] = channel
        return channel

    async def close(self, address: str, grace_s: float | None = None) -> None:
        """Closes the channel of address (e.g. a worker that left the registry)."""
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close(grace_s)

    async def close_all(self, grace_s: float | None = None) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close(grace_s)

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
