"""Certificates made by the tests: a CA, a leaf per role, and a rogue CA.

Under mTLS the role is a URI SAN (disagg.runtime.tls): ``cert`` is a worker's
(``spiffe://disagg/worker``), ``scheduler_cert`` a scheduler's, ``client_cert`` a
client's (``spiffe://disagg/client``: signed by the same CA, but no cluster role).
Every leaf also names localhost and 127.0.0.1, so each can serve on loopback."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from disagg.runtime.tls import SCHEDULER_URI, WORKER_URI

CLIENT_URI = "spiffe://disagg/client"  # a client's identity: not a cluster role


@dataclass(frozen=True)
class Pki:
    ca: str
    cert: str  # a worker's (URI SAN WORKER_URI)
    key: str
    scheduler_cert: str  # a scheduler's (URI SAN SCHEDULER_URI)
    scheduler_key: str
    client_cert: str  # a client's, same CA (URI SAN CLIENT_URI): opens no worker method
    client_key: str
    rogue_ca: str
    rogue_cert: str
    rogue_key: str


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> str:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(path)


def _write_cert(cert: x509.Certificate, path: Path) -> str:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, uri: str = WORKER_URI
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    san = x509.SubjectAlternativeName(
        [
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.UniformResourceIdentifier(uri),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("disagg"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(san, critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def make_pki(folder: Path) -> Pki:
    ca_key, ca = _ca("disagg test CA")
    key, cert = _leaf(ca_key, ca, WORKER_URI)
    skey, scert = _leaf(ca_key, ca, SCHEDULER_URI)
    ckey, ccert = _leaf(ca_key, ca, CLIENT_URI)
    rogue_ca_key, rogue_ca = _ca("rogue CA")
    rkey, rcert = _leaf(rogue_ca_key, rogue_ca)  # a worker's role, from the wrong CA
    return Pki(
        ca=_write_cert(ca, folder / "ca.pem"),
        cert=_write_cert(cert, folder / "cert.pem"),
        key=_write_key(key, folder / "key.pem"),
        scheduler_cert=_write_cert(scert, folder / "scheduler.pem"),
        scheduler_key=_write_key(skey, folder / "scheduler-key.pem"),
        client_cert=_write_cert(ccert, folder / "client.pem"),
        client_key=_write_key(ckey, folder / "client-key.pem"),
        rogue_ca=_write_cert(rogue_ca, folder / "rogue-ca.pem"),
        rogue_cert=_write_cert(rcert, folder / "rogue.pem"),
        rogue_key=_write_key(rkey, folder / "rogue-key.pem"),
    )
