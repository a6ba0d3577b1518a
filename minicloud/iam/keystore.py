"""The node's key store: master keys that encrypt secrets kept at rest (S3-style secret access keys, for a start).

Layout of ``directory`` (0700; every file 0600, 32 random bytes)::

    master.key          the current key: new ciphertexts use it
    keys/<key id>.key   every key that has been current, the current one included, so old ciphertexts still decrypt

A key's id is the first 8 bytes of SHA-256 over a label and the key, in hex: it names the key without revealing it.
Every key is in ``keys/`` (written atomically and fsynced) before anything is encrypted with it — a rotation writes
it there before making it current — so a crash, or two processes rotating at once, never loses a key that something
was encrypted with.

Ciphertexts are ``v1.<key id>.<base64url(12-byte nonce | AES-256-GCM ciphertext and tag)>``. The caller's
``context`` (the access key id, say) is the associated data: a ciphertext copied into another record does not
decrypt there. Nonces are random, which is safe for far more encryptions than a key store will see (the limit is
about 2**32 per key); :meth:`KeyStore.rotate` starts a new key whenever wanted, and :meth:`KeyStore.needs_reencrypt`
finds ciphertexts to re-encrypt lazily.

**Clusters**: every node must hold the same key store, as it holds the same CA key — the join flow copies the
directory to the new node. A node that lacks a key reports which key id is missing; a node that keeps encrypting with
an older current key after another rotated is harmless (all nodes can decrypt with it), and :meth:`KeyStore.reload`
picks up the new one.

Files are read and created on first use (a few small files: call :meth:`KeyStore.current_key_id` at start-up so
that happens before serving). Thread-safe. Nothing here logs; no message contains key material or plaintext.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import threading
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from minicloud.errors import MinicloudError

FORMAT_VERSION = "v1"
KEY_BYTES = 32
NONCE_BYTES = 12
MASTER_FILE = "master.key"
KEYS_DIR = "keys"
_TAG_BYTES = 16
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_TOKEN = re.compile(r"v1\.([0-9a-f]{16})\.([A-Za-z0-9_-]+)")


class KeyStoreError(MinicloudError):
    """The key store is unusable (unreadable, or a key file is damaged). An operator problem, hence a 500."""

    slug = "keystore"
    title = "The node's key store is not usable"


class DecryptionFailed(KeyStoreError):
    """A stored secret does not decrypt: altered, moved to another record, or encrypted with a key this node lacks."""

    slug = "keystore-decrypt"
    title = "A stored secret could not be decrypted"


def key_id_of(key: bytes) -> str:
    """The public name of a master key."""
    return hashlib.sha256(b"minicloud keystore key id\0" + key).hexdigest()[:16]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes | None:
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return data if _b64(data) == text else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_private(path: Path, data: bytes, *, exclusive: bool) -> bool:
    """Write ``data`` to ``path`` (0600) atomically and durably. With ``exclusive``, only if ``path`` does not exist
    yet: returns False (and writes nothing) when another writer got there first."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    finally:
        os.close(fd)
    try:
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return True


class KeyStore:
    """Master keys in ``directory``, created (with the directory) on first use. See the module docstring."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._current: str | None = None
        self._ciphers: dict[str, AESGCM] = {}

    # -- files ---------------------------------------------------------------------------------------------------

    def _read_key(self, path: Path) -> bytes:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise KeyStoreError(f"Cannot read the key store file {path.name}: {e.strerror}.") from None
        if len(data) != KEY_BYTES:
            raise KeyStoreError(
                f"The key store file {path.name} is damaged (not {KEY_BYTES} bytes); restore the key store from "
                "another node or a backup."
            )
        return data

    def _load_locked(self) -> None:
        """(Re)read every key from disk, creating the store if it does not exist."""
        keys_dir = self.directory / KEYS_DIR
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.directory, 0o700)
            keys_dir.mkdir(exist_ok=True, mode=0o700)
            os.chmod(keys_dir, 0o700)
            master = self.directory / MASTER_FILE
            if not master.exists():
                # Exclusive: when several processes start at once, one key wins and all use it. It reaches keys/
                # below, before anything is encrypted with it.
                _write_private(master, os.urandom(KEY_BYTES), exclusive=True)
            current = self._read_key(master)
            ciphers: dict[str, AESGCM] = {}
            for path in keys_dir.iterdir():
                if path.suffix != ".key" or not _KEY_ID.fullmatch(path.stem):
                    continue
                key = self._read_key(path)
                if key_id_of(key) != path.stem:
                    raise KeyStoreError(
                        f"The key store file {KEYS_DIR}/{path.name} does not hold the key its name says; restore the "
                        "key store from another node or a backup."
                    )
                ciphers[path.stem] = AESGCM(key)
            current_id = key_id_of(current)
            if current_id not in ciphers:  # a new store, or only master.key was copied here
                _write_private(keys_dir / f"{current_id}.key", current, exclusive=False)
                ciphers[current_id] = AESGCM(current)
        except OSError as e:
            raise KeyStoreError(f"The node's key store is not usable: {e.strerror}.") from None
        self._ciphers = ciphers
        self._current = current_id

    def _ensure(self) -> str:
        with self._lock:
            if self._current is None:
                self._load_locked()
            assert self._current is not None
            return self._current

    def export(self) -> dict[str, str]:
        """Every key file (master and old keys), base64, by path relative to the store: what a joining node needs
        so that it can decrypt what any node encrypted. Key material: send only over an authenticated TLS channel."""
        self._ensure()
        files = {MASTER_FILE: self.directory / MASTER_FILE}
        files.update({f"{KEYS_DIR}/{p.name}": p for p in (self.directory / KEYS_DIR).iterdir() if p.suffix == ".key"})
        return {name: base64.b64encode(path.read_bytes()).decode() for name, path in sorted(files.items())}

    def adopt(self, exported: dict[str, str]) -> None:
        """Replace this store's keys with another node's :meth:`export` (a node joining a cluster), then reload."""
        keys_dir = self.directory / KEYS_DIR
        keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for old in keys_dir.iterdir():
            old.unlink()
        for name, data in exported.items():
            if name != MASTER_FILE and not re.fullmatch(rf"{KEYS_DIR}/[0-9a-f]{{16}}\.key", name):
                raise KeyStoreError(f"unexpected key store file {name!r}")
            _write_private(self.directory / name, base64.b64decode(data), exclusive=False)
        self.reload()

    def reload(self) -> None:
        """Re-read the keys from disk (to pick up a rotation made by another process or copied from another node)."""
        with self._lock:
            self._load_locked()

    # -- keys ----------------------------------------------------------------------------------------------------

    def current_key_id(self) -> str:
        """The id of the key new ciphertexts use (creating the store on first use)."""
        return self._ensure()

    def key_ids(self) -> list[str]:
        """Every key id this store can decrypt with, sorted."""
        self._ensure()
        return sorted(self._ciphers)

    def rotate(self) -> str:
        """Make a new random key current and return its id. Old keys stay, so existing ciphertexts still decrypt.
        Durable when it returns; a crash part-way leaves the old key current and nothing lost."""
        with self._lock:
            self._load_locked()
            key = os.urandom(KEY_BYTES)
            new_id = key_id_of(key)
            try:
                _write_private(self.directory / KEYS_DIR / f"{new_id}.key", key, exclusive=False)
                _write_private(self.directory / MASTER_FILE, key, exclusive=False)
            except OSError as e:
                raise KeyStoreError(f"Could not rotate the key store key: {e.strerror}.") from None
            self._ciphers[new_id] = AESGCM(key)
            self._current = new_id
            return new_id

    # -- encryption ----------------------------------------------------------------------------------------------

    def encrypt(self, plaintext: bytes, context: bytes) -> str:
        """``plaintext`` encrypted with the current key and bound to ``context`` (the associated data: the record the
        secret belongs to). Returns ``v1.<key id>.<base64url>``, safe to store in a record."""
        if not isinstance(plaintext, bytes) or not isinstance(context, bytes):
            raise TypeError("plaintext and context must be bytes")
        key_id = self._ensure()
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[key_id].encrypt(nonce, plaintext, context)
        return f"{FORMAT_VERSION}.{key_id}.{_b64(nonce + sealed)}"

    def decrypt(self, token: str, context: bytes) -> bytes:
        """The plaintext of ``token`` if it was made by :meth:`encrypt` with the same ``context`` under a key this
        store holds. Raises :class:`DecryptionFailed` otherwise (malformed, altered, wrong context, unknown key id);
        an unknown key id first makes the store re-read its files once."""
        m = _TOKEN.fullmatch(token) if isinstance(token, str) else None
        data = _unb64(m.group(2)) if m else None
        if m is None or data is None or len(data) < NONCE_BYTES + _TAG_BYTES:
            raise DecryptionFailed("A stored secret is malformed (not a key store ciphertext); it cannot be used.")
        key_id = m.group(1)
        self._ensure()
        if key_id not in self._ciphers:
            self.reload()
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise DecryptionFailed(
                f"A stored secret was encrypted with key store key {key_id}, which this node does not have; copy the "
                "key store from a node that has it."
            )
        try:
            return cipher.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], context)
        except InvalidTag:
            raise DecryptionFailed(
                "A stored secret could not be decrypted: it was altered, or it belongs to another record."
            ) from None

    def needs_reencrypt(self, token: str) -> bool:
        """True when ``token`` was not made with the current key (decrypt and encrypt it again to move it over)."""
        m = _TOKEN.fullmatch(token) if isinstance(token, str) else None
        return m is None or m.group(1) != self._ensure()
