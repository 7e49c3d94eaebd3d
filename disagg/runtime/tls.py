"""TLS and mutual TLS for every gRPC link.

One set of PEM files per process serves both directions: ``cert``/``key``
identify this process as a server and, for mTLS, as a client; ``ca`` verifies
peers. A server given ``ca`` requires client certificates (mTLS). Nothing set:
plaintext (the default, for loopback).

Roles under mTLS. One CA may sign clients' certificates too, so "signed by the
CA" does not make a caller a member of the cluster. A scheduler's or a
worker's certificate carries its role as a URI SAN -- ``SCHEDULER_URI`` or
``WORKER_URI`` -- and worker methods require one of them
(``required_peer_uris``, checked by ``cluster_auth.require_token``). A
client's certificate carries neither (any other SAN is fine). The scheduler's
own methods accept any certificate from the CA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

SCHEDULER_URI = "spiffe://disagg/scheduler"  # URI SAN of a scheduler's certificate
WORKER_URI = "spiffe://disagg/worker"  # URI SAN of a prefill or decode worker's certificate
CLUSTER_URIS = (SCHEDULER_URI, WORKER_URI)  # the identities worker methods accept under mTLS


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


def required_peer_uris(tls: TlsFiles) -> tuple[str, ...]:
    """URI SANs a caller of worker methods must present: the cluster roles under mTLS
    (a certificate and a CA), none otherwise (no client certificate to read)."""
    return CLUSTER_URIS if tls.server_enabled and tls.client_enabled else ()


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
