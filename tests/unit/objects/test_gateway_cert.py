"""The gateway's certificate: the node's without a domain; with one, its own from the cluster CA naming ``s3.DOMAIN``
and ``*.s3.DOMAIN`` besides the node's names (clients verifying the host name accept ``BUCKET.s3.DOMAIN``), kept while
valid and made again when the domain changes."""

from __future__ import annotations

import ssl

from cryptography import x509

from agent.storage.rgw import gateway_cert
from minicloud import pki


def _names(path) -> set[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return {str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value}


def test_the_gateway_certificate_names_the_virtual_host_domain(tmp_path):
    paths = pki.ensure_node_pki(tmp_path, "n1")
    assert gateway_cert(paths.ca_cert.parent, "n1", "") == (paths.server_cert, paths.server_key)
    crt, key = gateway_cert(paths.ca_cert.parent, "n1", "s3.example.com")
    assert crt.name == "rgw.crt" and {"s3.example.com", "*.s3.example.com", "n1"} <= _names(crt)
    assert _names(paths.server_cert) <= _names(crt)
    # a TLS client verifying the host name against the cluster CA accepts a bucket's virtual host
    assert _handshake(paths.ca_cert, crt, key, "photos.s3.example.com") is None
    assert "Hostname mismatch" in str(_handshake(paths.ca_cert, crt, key, "photos.s3.elsewhere.org"))
    mtime = crt.stat().st_mtime_ns
    assert gateway_cert(paths.ca_cert.parent, "n1", "s3.example.com")[0].stat().st_mtime_ns == mtime  # kept
    gateway_cert(paths.ca_cert.parent, "n1", "s3.other.org")
    assert "*.s3.other.org" in _names(crt) and "*.s3.example.com" not in _names(crt)


def _handshake(ca, crt, key, host: str) -> Exception | None:
    """A TLS handshake in memory: a client verifying ``host`` against ``ca``, a server with ``crt``/``key``."""
    client = ssl.create_default_context(cafile=str(ca))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(str(crt), str(key))
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=host)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, end in (("c", c), ("s", s)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as exc:
                    return exc
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return None
    return TimeoutError("no handshake")
