"""SSH key pairs: parse and fingerprint OpenSSH public keys with ``cryptography``.

We accept exactly one OpenSSH public key line (``TYPE BASE64 [COMMENT]``), check that the key itself parses and that
the type in the line matches the key blob, and compute the fingerprint the way ``ssh-keygen -lf`` prints it
(``SHA256:`` + unpadded base64 of the SHA-256 of the key blob), so users can compare the two.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from minicloud import errors
from minicloud.compute.kinds import KEYPAIR, KeyPairSpec
from minicloud.core import crud
from minicloud.core.context import Context
from minicloud.core.write import Written
from minicloud.model import KeyPairCreate
from minicloud.state import Store

SUPPORTED = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521")
MIN_RSA_BITS = 2048


@dataclass(frozen=True)
class ParsedKey:
    type: str
    public_key: str  # normalised "TYPE BASE64 [COMMENT]"
    fingerprint: str
    comment: str


def _invalid(reason: str) -> errors.ValidationFailed:
    return errors.ValidationFailed(
        f"public_key is not a valid OpenSSH public key: {reason}. Paste one line of a .pub file, "
        "e.g. the output of `cat ~/.ssh/id_ed25519.pub`",
        invalid_params=[{"name": "public_key", "reason": reason}],
    )


def parse_public_key(text: str) -> ParsedKey:
    """Validate and fingerprint one OpenSSH public key line. Raises ``ValidationFailed`` saying what is wrong."""
    line = text.strip()
    if "\n" in line or "\r" in line:
        raise _invalid("it has more than one line; import one key at a time")
    if line.startswith("-----BEGIN"):
        raise _invalid("it is PEM, not OpenSSH format; convert it with `ssh-keygen -i -m PKCS8 -f key.pem`")
    if "PRIVATE KEY" in line:
        raise _invalid("it looks like a private key; never upload private keys, use the .pub file")
    parts = line.split(None, 2)
    if len(parts) < 2:
        raise _invalid("expected 'TYPE BASE64 [COMMENT]'")
    key_type, b64 = parts[0], parts[1]
    comment = parts[2] if len(parts) == 3 else ""
    if key_type not in SUPPORTED:
        raise _invalid(f"key type '{key_type[:40]}' is not supported; use one of {', '.join(SUPPORTED)}")
    try:
        blob = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid("the key data is not valid base64") from None
    # The blob starts with the length-prefixed key type; it must agree with the type written in front of it.
    if len(blob) < 4 or blob[4 : 4 + int.from_bytes(blob[:4], "big")] != key_type.encode():
        raise _invalid(f"the key data does not hold a {key_type} key")
    try:
        key = serialization.load_ssh_public_key(f"{key_type} {b64}".encode())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise _invalid(f"the key data is corrupt ({exc})") from None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise _invalid(f"RSA keys must have at least {MIN_RSA_BITS} bits (this one has {key.key_size})")
    fp = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    normalised = f"{key_type} {b64}" + (f" {comment}" if comment else "")
    return ParsedKey(type=key_type, public_key=normalised, fingerprint=fp, comment=comment)


async def import_keypair(ctx: Context, store: Store, body: KeyPairCreate) -> Written:
    """Import an OpenSSH public key as a key pair in ``ctx``'s project (422 naming the problem for a bad key; 409
    when the name is taken). Atomic; idempotent under ``ctx.idempotency``."""
    key = parse_public_key(body.public_key)
    spec = KeyPairSpec(
        type=key.type,
        fingerprint=key.fingerprint,
        public_key=key.public_key,
        comment=key.comment,
        description=body.description,
    )
    obj = KEYPAIR.new(project=ctx.project, name=body.name, spec=spec, labels=body.labels, stamp=ctx.clock())
    return await crud.create(ctx, store, KEYPAIR, obj)
