"""TLS and mutual TLS for every gRPC link.

One set of PEM files per process serves both directions: ``cert``/``key``
identify this process as a server and, for mTLS, as a client; ``ca`` verifies
peers. A server given ``ca`` requires client certificates (mTLS). Nothing set:
plaintext (the default, for loopback).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TlsFiles:
    cert: str = ""  # PEM certificate chain of this process
    key: str = ""  # PEM private key of cert
    ca: str = ""  # PEM CA bundle that peers' certificates must chain to

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise ValueError("tls_cert and tls_key must be given together")
        for path in (self.cert, self.key, self.ca):
            if path and not Path(path).is_file():
                raise ValueError(f"TLS file not found: {path}")

    @property
    def server_enabled(self) -> bool:
        return bool(self.cert)

    @property
    def client_enabled(self) -> bool:
        return bool(self.ca)


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials | None:
    """Credentials for a server (mTLS when a CA is given); None = plaintext."""
    if not tls.server_enabled:
        return None
    ca = _read(tls.ca)
    return grpc.ssl_server_credentials(
        [(_read(tls.key), _read(tls.cert))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials | None:
    """Credentials for calls to other services (with our certificate for mTLS); None = plaintext."""
    if not tls.client_enabled:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca),
        private_key=_read(tls.key),
        certificate_chain=_read(tls.cert),
    )


def sync_channel(address: str, tls: TlsFiles) -> grpc.Channel:
    """A blocking-API channel for command-line clients (TLS when tls has a CA)."""
    creds = channel_credentials(tls)
    return grpc.insecure_channel(address) if creds is None else grpc.secure_channel(address, creds)
