"""The node's certificate authority and server certificate, made with ``cryptography``.

On first start the agent creates ``<data_dir>/pki/ca.{crt,key}`` (the cluster CA; later nodes get theirs from the
join flow) and a server certificate signed by it for every name and address the node answers on. Clients pin the
CA's SHA-256 fingerprint on first use, like ssh's known_hosts. Keys are written 0600 and never leave the node.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVER_DAYS = 397
RENEW_BEFORE = _dt.timedelta(days=30)


@dataclass(frozen=True)
class NodePKI:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @property
    def ca_fingerprint(self) -> str:
        """The CA's fingerprint, recomputed only when the file changes (a node that joins a cluster gets its CA)."""
        return _file_fingerprint(str(self.ca_cert), self.ca_cert.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_fingerprint(path: str, mtime_ns: int) -> str:
    return fingerprint(Path(path).read_bytes())


def fingerprint(pem: bytes) -> str:
    """``sha256:<hex>`` of a PEM certificate's DER encoding: what users compare and clients pin."""
    der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    return "sha256:" + hashlib.sha256(der).hexdigest()


def write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _local_names() -> tuple[list[str], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    names = sorted({"localhost", socket.gethostname(), socket.getfqdn()})
    ips: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    ips.add(ipaddress.ip_address(a.address.split("%")[0]))
                except ValueError:
                    continue
    return names, sorted(ips, key=lambda ip: (ip.version, int(ip)))


def create_ca(common_name: str = "minicloud cluster CA") -> tuple[bytes, bytes]:
    """A new self-signed CA: ``(cert_pem, key_pem)``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "minicloud"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    now = _dt.datetime.now(_dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def node_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    public_key: Any,
    node_name: str,
    sans: list[x509.GeneralName],
    *,
    days: int = SERVER_DAYS,
) -> x509.Certificate:
    """The one shape of node certificate: CN = node name, the given SANs, serverAuth + clientAuth (HTTPS, node-to-node
    mutual TLS, etcd client and peer TLS), never a CA, and never valid beyond the CA itself."""
    now = _dt.datetime.now(_dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "minicloud"),
                    x509.NameAttribute(NameOID.COMMON_NAME, node_name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(min(now + _dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                # Set for EC keys too: libvirtd (GnuTLS) refuses a TLS certificate whose critical keyUsage lacks
                # keyEncipherment, whatever its key type, and live migration authenticates libvirtds with these.
                key_encipherment=True,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def issue_server_cert(ca_cert_pem: bytes, ca_key_pem: bytes, node_name: str) -> tuple[bytes, bytes]:
    """A server (and client, for node-to-node mTLS) certificate for this host: ``(cert_pem, key_pem)``."""
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    names, ips = _local_names()
    if node_name not in names:
        names.append(node_name)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names] + [x509.IPAddress(ip) for ip in ips]
    cert = node_certificate(ca_cert, ca_key, key.public_key(), node_name, sans, days=SERVER_DAYS)
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def ensure_node_pki(data_dir: Path, node_name: str) -> NodePKI:
    """Create the CA and server certificate if missing; renew the server certificate when it nears expiry.

    Idempotent: an existing, valid set of files is left untouched. Files are replaced atomically.
    """
    pki_dir = Path(data_dir) / "pki"
    pki_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(pki_dir, 0o700)
    paths = NodePKI(pki_dir / "ca.crt", pki_dir / "ca.key", pki_dir / "server.crt", pki_dir / "server.key")
    if not (paths.ca_cert.exists() and paths.ca_key.exists()):
        cert, key = create_ca()
        write_private(paths.ca_key, key)
        write_private(paths.ca_cert, cert)
    renew = not (paths.server_cert.exists() and paths.server_key.exists())
    if not renew:
        current = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
        renew = current.not_valid_after_utc - _dt.datetime.now(_dt.UTC) < RENEW_BEFORE
    if renew:
        cert, key = issue_server_cert(paths.ca_cert.read_bytes(), paths.ca_key.read_bytes(), node_name)
        write_private(paths.server_key, key)
        write_private(paths.server_cert, cert + paths.ca_cert.read_bytes())
    return paths
