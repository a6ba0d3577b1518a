"""The node's key store: AES-256-GCM secrets at rest bound to their record, key rotation, files on disk."""

from __future__ import annotations

import base64
import os
import stat
import threading

import pytest

from minicloud.iam.keystore import DecryptionFailed, KeyStore, KeyStoreError, key_id_of

SECRET = b"wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
CONTEXT = b"AKIA0000000000000001"


@pytest.fixture
def store(tmp_path) -> KeyStore:
    return KeyStore(tmp_path / "keystore")


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_round_trip(store):
    token = store.encrypt(SECRET, CONTEXT)
    assert store.decrypt(token, CONTEXT) == SECRET
    assert store.decrypt(store.encrypt(b"", b""), b"") == b""


def test_ciphertext_is_versioned_names_its_key_and_hides_the_plaintext(store):
    token = store.encrypt(SECRET, CONTEXT)
    version, key_id, _body = token.split(".")
    assert version == "v1" and key_id == store.current_key_id()
    assert SECRET.decode() not in token and base64.urlsafe_b64encode(SECRET).decode()[:20] not in token
    assert store.encrypt(SECRET, CONTEXT) != token  # fresh nonce every time


def test_nothing_is_created_before_first_use(tmp_path):
    KeyStore(tmp_path / "ks")
    assert not (tmp_path / "ks").exists()


def test_files_are_private(store, tmp_path):
    old_umask = os.umask(0o022)
    try:
        store.current_key_id()
    finally:
        os.umask(old_umask)
    directory = tmp_path / "keystore"
    assert mode(directory) == 0o700 and mode(directory / "keys") == 0o700
    master = directory / "master.key"
    assert mode(master) == 0o600 and len(master.read_bytes()) == 32
    for path in (directory / "keys").iterdir():
        assert mode(path) == 0o600
    assert not [p for p in directory.rglob("*.tmp")]


def test_a_second_instance_on_the_same_directory_reads_the_same_key(store, tmp_path):
    token = store.encrypt(SECRET, CONTEXT)
    again = KeyStore(tmp_path / "keystore")
    assert again.current_key_id() == store.current_key_id()
    assert again.decrypt(token, CONTEXT) == SECRET


def test_concurrent_first_use_agrees_on_one_key(tmp_path):
    stores = [KeyStore(tmp_path / "ks") for _ in range(8)]
    ids: list[str] = []
    threads = [threading.Thread(target=lambda s=s: ids.append(s.current_key_id())) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1
    assert [p.name for p in (tmp_path / "ks" / "keys").iterdir()] == [f"{ids[0]}.key"]


def test_wrong_context_is_refused(store):
    token = store.encrypt(SECRET, CONTEXT)
    with pytest.raises(DecryptionFailed, match="another record") as e:
        store.decrypt(token, b"AKIA0000000000000002")
    assert SECRET.decode() not in e.value.detail and e.value.status == 500
    with pytest.raises(DecryptionFailed):
        store.decrypt(token, b"")


def test_every_tampered_byte_is_refused(store):
    token = store.encrypt(SECRET, CONTEXT)
    version, key_id, body = token.split(".")
    raw = base64.urlsafe_b64decode(body + "==")
    for i in range(len(raw)):
        flipped = raw[:i] + bytes([raw[i] ^ 0x01]) + raw[i + 1 :]
        tampered = f"{version}.{key_id}.{base64.urlsafe_b64encode(flipped).decode().rstrip('=')}"
        with pytest.raises(DecryptionFailed):
            store.decrypt(tampered, CONTEXT)
    with pytest.raises(DecryptionFailed):  # truncated
        store.decrypt(token[:-4], CONTEXT)


@pytest.mark.parametrize(
    "bad",
    ["", "v1", "v1..", "v2.0123456789abcdef.AAAA", "v1.0123456789ABCDEF.AAAA", "v1.0123456789abcdef.AAAA", None, b"v1"],
)
def test_malformed_ciphertexts_are_refused(store, bad):
    with pytest.raises(DecryptionFailed):
        store.decrypt(bad, CONTEXT)


def test_unknown_key_id_names_the_missing_key(store, tmp_path):
    other = KeyStore(tmp_path / "elsewhere")
    token = other.encrypt(SECRET, CONTEXT)
    with pytest.raises(DecryptionFailed, match=other.current_key_id()) as e:
        store.decrypt(token, CONTEXT)
    assert "copy the key store" in e.value.detail


def test_a_ciphertext_moved_under_another_key_id_is_refused(store):
    token = store.encrypt(SECRET, CONTEXT)
    store.rotate()
    _, _, body = token.split(".")
    with pytest.raises(DecryptionFailed):
        store.decrypt(f"v1.{store.current_key_id()}.{body}", CONTEXT)


def test_rotation_keeps_old_ciphertexts_and_uses_the_new_key(store, tmp_path):
    old_token = store.encrypt(SECRET, CONTEXT)
    old_id = store.current_key_id()
    new_id = store.rotate()
    assert new_id != old_id and store.current_key_id() == new_id
    new_token = store.encrypt(SECRET, CONTEXT)
    assert new_token.split(".")[1] == new_id
    assert store.decrypt(old_token, CONTEXT) == SECRET and store.decrypt(new_token, CONTEXT) == SECRET
    assert store.needs_reencrypt(old_token) and not store.needs_reencrypt(new_token)
    assert store.key_ids() == sorted([old_id, new_id])
    # durable: a fresh instance (a restart) sees the same
    restarted = KeyStore(tmp_path / "keystore")
    assert restarted.current_key_id() == new_id
    assert restarted.decrypt(old_token, CONTEXT) == SECRET
    assert (tmp_path / "keystore" / "master.key").read_bytes() != b""
    assert key_id_of((tmp_path / "keystore" / "master.key").read_bytes()) == new_id
    assert {p.name for p in (tmp_path / "keystore" / "keys").iterdir()} == {f"{old_id}.key", f"{new_id}.key"}


def test_a_rotation_by_another_process_is_picked_up_on_demand(store, tmp_path):
    store.current_key_id()
    elsewhere = KeyStore(tmp_path / "keystore")
    elsewhere.rotate()
    token = elsewhere.encrypt(SECRET, CONTEXT)
    assert store.decrypt(token, CONTEXT) == SECRET  # unknown id: re-read from disk
    assert store.current_key_id() == elsewhere.current_key_id()


def test_a_store_copied_as_master_key_only_still_works(tmp_path):
    first = KeyStore(tmp_path / "a")
    token = first.encrypt(SECRET, CONTEXT)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "master.key").write_bytes((tmp_path / "a" / "master.key").read_bytes())
    copy = KeyStore(tmp_path / "b")
    assert copy.decrypt(token, CONTEXT) == SECRET
    assert (tmp_path / "b" / "keys" / f"{copy.current_key_id()}.key").exists()


def test_a_damaged_master_key_is_reported_without_its_contents(tmp_path):
    directory = tmp_path / "ks"
    directory.mkdir()
    (directory / "master.key").write_bytes(b"too short")
    with pytest.raises(KeyStoreError, match="damaged") as e:
        KeyStore(directory).current_key_id()
    assert "too short" not in e.value.detail


def test_a_key_file_that_does_not_match_its_name_is_reported(store, tmp_path):
    store.current_key_id()
    (tmp_path / "keystore" / "keys" / "0123456789abcdef.key").write_bytes(os.urandom(32))
    with pytest.raises(KeyStoreError, match="does not hold the key"):
        KeyStore(tmp_path / "keystore").current_key_id()


def test_encrypt_wants_bytes(store):
    with pytest.raises(TypeError):
        store.encrypt("text", CONTEXT)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        store.encrypt(SECRET, "context")  # type: ignore[arg-type]


def test_a_joining_node_adopts_the_cluster_key_store(tmp_path):
    first = KeyStore(tmp_path / "n1")
    old = first.encrypt(b"before rotation", b"ctx")
    first.rotate()
    new = first.encrypt(b"after rotation", b"ctx")
    joiner = KeyStore(tmp_path / "n2")
    joiner.encrypt(b"its own, soon gone", b"ctx")
    joiner.adopt(first.export())
    assert joiner.decrypt(old, b"ctx") == b"before rotation"
    assert joiner.decrypt(new, b"ctx") == b"after rotation"
    assert joiner.current_key_id() == first.current_key_id()
    assert sorted(joiner.key_ids()) == sorted(first.key_ids())


def test_adopt_refuses_unexpected_file_names(tmp_path):
    store = KeyStore(tmp_path / "s")
    with pytest.raises(KeyStoreError):
        store.adopt({"../../etc/passwd": "AAAA"})
