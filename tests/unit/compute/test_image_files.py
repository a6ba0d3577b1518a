"""The node's image store copies files hashing them, and keeps thin images thin."""

from __future__ import annotations

import hashlib
import os

from minicloud.compute import image_files


def test_a_copy_keeps_holes_and_the_exact_bytes_and_hash(tmp_path):
    src = tmp_path / "disk.raw"
    data = os.urandom(3 * image_files.CHUNK + 123)
    with src.open("wb") as f:
        f.write(data[: image_files.CHUNK])
        f.seek(64 * image_files.CHUNK)  # 63 MiB of hole
        f.write(data)
        f.seek(200 * image_files.CHUNK + 7)  # ends in a hole that is not a whole chunk
        f.truncate()
    dst = tmp_path / "copy"
    stored = image_files._copy_hashing(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert stored.size_bytes == src.stat().st_size == 200 * image_files.CHUNK + 7
    assert stored.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    # Thin stays thin: the copy allocates about what the source holds, not its length.
    assert dst.stat().st_blocks * 512 < 8 * image_files.CHUNK


def test_an_empty_file_copies_as_empty(tmp_path):
    src = tmp_path / "empty"
    src.write_bytes(b"")
    stored = image_files._copy_hashing(src, tmp_path / "copy")
    assert (stored.size_bytes, (tmp_path / "copy").read_bytes()) == (0, b"")
