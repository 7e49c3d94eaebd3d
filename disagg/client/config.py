"""How a client reaches the scheduler: address, credentials, API key, channel options.

Unset arguments come from the same ``DISAGG_*`` variables as the services
(read by ``disagg.runtime.config.from_env``): ``DISAGG_API_KEY``, and
``DISAGG_TLS_CA`` (TLS, verifying the server against that CA) with
``DISAGG_TLS_CERT`` + ``DISAGG_TLS_KEY`` (presented for mTLS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc

from disagg.runtime.config import from_env
from disagg.runtime.grpc_server import message_size_options
from disagg.runtime.tls import TlsFiles, channel_credentials

DEFAULT_ADDRESS = "127.0.0.1:50051"


@dataclass(frozen=True)
class ClientConfig:
    api_key: str = ""  # sent as 'authorization: Bearer <key>'; "" = none
    tls_ca: str = ""  # PEM CA: speak TLS and verify the server against it; "" = plaintext
    tls_cert: str = ""  # PEM client certificate, presented for mTLS (with tls_key)
    tls_key: str = ""  # PEM private key of tls_cert


@dataclass(frozen=True)
class Connection:
    """Everything a channel and its calls need, resolved once per client."""

    address: str
    credentials: grpc.ChannelCredentials | None  # None = plaintext
    metadata: tuple[tuple[str, str], ...]  # sent with every call (the API key)
    options: tuple[tuple[str, Any], ...]  # channel options

    def sync_channel(self) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.address, options=self.options)
        return grpc.secure_channel(self.address, self.credentials, options=self.options)

    def aio_channel(self) -> grpc.aio.Channel:
        if self.credentials is None:
            return grpc.aio.insecure_channel(self.address, options=self.options)
        return grpc.aio.secure_channel(self.address, self.credentials, options=self.options)


def resolve(
    address: str,
    api_key: str | None = None,
    tls: TlsFiles | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    server_name: str = "",
) -> Connection:
    """api_key / tls None: from the environment; credentials, when given, win over tls."""
    env = from_env(ClientConfig)
    key = env.api_key if api_key is None else api_key
    if credentials is None:
        files = TlsFiles(cert=env.tls_cert, key=env.tls_key, ca=env.tls_ca) if tls is None else tls
        credentials = channel_credentials(files)
    options: list[tuple[str, Any]] = list(message_size_options())
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    return Connection(address, credentials, metadata, tuple(options))
