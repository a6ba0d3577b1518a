"""Shared fixtures: an in-process API (unit tests) and helpers to make SSH keys."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519


def make_ssh_key(comment: str = "test@minicloud") -> str:
    key = ed25519.Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{pub.decode()} {comment}"


@pytest.fixture(scope="session")
def ssh_key() -> str:
    return make_ssh_key()
