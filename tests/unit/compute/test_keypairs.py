"""OpenSSH public key parsing and fingerprints, checked against ssh-keygen where it is installed."""

from __future__ import annotations

import base64
import shutil
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from minicloud.compute.keypairs import parse_public_key
from minicloud.errors import ValidationFailed
from tests.conftest import make_ssh_key


def openssh(key) -> str:
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


@pytest.mark.parametrize(
    "make",
    [lambda: rsa.generate_private_key(65537, 2048), lambda: ec.generate_private_key(ec.SECP256R1())],
    ids=["rsa", "ecdsa"],
)
def test_supported_key_types_parse(make):
    line = openssh(make()) + " me@host"
    parsed = parse_public_key(line + "\n")
    assert parsed.public_key == line and parsed.comment == "me@host"


@pytest.mark.skipif(not shutil.which("ssh-keygen"), reason="needs ssh-keygen (openssh-client) to compare fingerprints")
def test_fingerprint_matches_ssh_keygen(tmp_path):
    line = make_ssh_key("c")
    (tmp_path / "k.pub").write_text(line)
    out = subprocess.run(["ssh-keygen", "-lf", str(tmp_path / "k.pub")], capture_output=True, text=True, check=True)
    assert parse_public_key(line).fingerprint == out.stdout.split()[1]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "TYPE BASE64"),
        ("ssh-ed25519", "TYPE BASE64"),
        ("ssh-dss AAAAB3NzaC1kc3M=", "not supported"),
        ("ssh-ed25519 !!!notbase64", "base64"),
        ("ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\x07ssh-rsa" + b"\x00" * 40).decode(), "does not hold"),
        ("ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x05short").decode(), "corrupt"),
        ("-----BEGIN PUBLIC KEY-----", "PEM"),
        ("a\nb", "more than one line"),
    ],
)
def test_malformed_keys_are_rejected_with_a_reason(text, needle):
    with pytest.raises(ValidationFailed) as exc:
        parse_public_key(text)
    assert needle in exc.value.detail


def test_weak_rsa_keys_are_rejected():
    with pytest.raises(ValidationFailed, match="at least 2048"):
        parse_public_key(openssh(rsa.generate_private_key(65537, 1024)))
