"""The ``local`` volume driver against the real ``qemu-img``: qcow2 files, internal snapshots, overlays as clones."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from agent.storage.driver import InUse, NotFound, StorageError, read_qcow2_header
from agent.storage.local import LocalDriver

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img is missing (qemu-utils)")

MiB = 1 << 20


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2") -> str:
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    return subprocess.run([*argv, str(path)], check=True, capture_output=True, text=True).stdout


def write(path: Path, byte: int, offset: int = 0, length: int = 64 * 1024, fmt: str = "qcow2") -> None:
    qemu_io(path, f"write -P {byte} {offset} {length}", fmt=fmt)


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, timeout=60)


def open_in_background(path: Path) -> subprocess.Popen[str]:
    """A ``qemu-io`` holding ``path`` open with QEMU's image lock (standing for a running guest), once it has it."""
    holder = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.write("read 0 512\n")  # answered once the image is open (and locked)
    holder.stdin.flush()
    holder.stdout.readline()
    return holder


def close(holder: subprocess.Popen[str]) -> None:
    """End the holder cleanly (a killed client's RBD watch would linger until the OSDs time it out, 30 s)."""
    assert holder.stdin is not None
    holder.stdin.close()
    try:
        holder.wait(timeout=30)
    except subprocess.TimeoutExpired:
        holder.kill()
        holder.wait()


def holds(path: Path, byte: int, offset: int = 0, length: int = 64 * 1024) -> bool:
    out = qemu_io(path, f"read -P {byte} {offset} {length}")
    return "Pattern verification failed" not in out


@pytest.fixture
def drv(tmp_path: Path) -> LocalDriver:
    return LocalDriver(tmp_path / "pool")


async def test_create_is_idempotent_and_refuses_another_size(drv: LocalDriver) -> None:
    await drv.create("vol-a", 16 * MiB)
    await drv.create("vol-a", 16 * MiB)
    assert await drv.size("vol-a") == 16 * MiB
    assert await drv.list() == ["vol-a"]
    with pytest.raises(StorageError, match="already exists"):
        await drv.create("vol-a", 32 * MiB)
    src = drv.source("vol-a")
    assert (src.kind, src.format, src.path) == ("file", "qcow2", str(drv.root / "vol-a.qcow2"))


async def test_resize_grows_only(drv: LocalDriver) -> None:
    await drv.create("vol-a", 16 * MiB)
    await drv.resize("vol-a", 32 * MiB)
    await drv.resize("vol-a", 32 * MiB)
    assert await drv.size("vol-a") == 32 * MiB
    with pytest.raises(StorageError, match="only grow"):
        await drv.resize("vol-a", 16 * MiB)
    with pytest.raises(NotFound):
        await drv.resize("vol-missing", 16 * MiB)


async def test_snapshot_rollback_and_delete_snapshot(drv: LocalDriver) -> None:
    await drv.create("vol-a", 16 * MiB)
    path = drv.root / "vol-a.qcow2"
    write(path, 0x11)
    await drv.snapshot("vol-a", "snap-1")
    await drv.snapshot("vol-a", "snap-1")  # idempotent
    write(path, 0x22)
    assert await drv.snapshots("vol-a") == ["snap-1"]
    await drv.rollback("vol-a", "snap-1")
    assert holds(path, 0x11)
    with pytest.raises(NotFound):
        await drv.rollback("vol-a", "snap-missing")
    await drv.delete_snapshot("vol-a", "snap-1")
    await drv.delete_snapshot("vol-a", "snap-1")
    assert await drv.snapshots("vol-a") == []


async def test_image_import_protect_clone_children_and_in_use(drv: LocalDriver, tmp_path: Path) -> None:
    raw = tmp_path / "src.raw"
    raw.write_bytes(b"\0" * (8 * MiB))
    write(raw, 0x5A, fmt="raw")
    src = tmp_path / "src.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(src))

    assert await drv.import_file(src, "img-1") == 8 * MiB
    assert await drv.import_file(src, "img-1") == 8 * MiB  # done already
    assert await drv.import_file(raw, "img-2") == 8 * MiB  # raw sources too, stored as qcow2
    assert read_qcow2_header(drv.root / "img-2.qcow2") is not None
    await drv.snapshot("img-1", "base", protect=True)
    await drv.snapshot("img-1", "base", protect=True)  # idempotent

    await drv.clone("img-1", "base", "i-1-root", 32 * MiB)
    await drv.clone("img-1", "base", "i-1-root", 32 * MiB)  # idempotent
    root = drv.root / "i-1-root.qcow2"
    header = read_qcow2_header(root)
    assert header is not None and header.backing_file == "img-1.qcow2" and header.size == 32 * MiB
    assert holds(root, 0x5A)
    assert await drv.children("img-1", "base") == ["i-1-root"]
    assert await drv.children("img-1", "other") == []

    with pytest.raises(InUse, match="i-1-root"):
        await drv.delete_snapshot("img-1", "base")
    with pytest.raises(InUse, match="i-1-root"):
        await drv.delete("img-1")
    with pytest.raises(InUse):  # a protected volume does not change
        await drv.resize("img-1", 64 * MiB)
    with pytest.raises(StorageError, match="not a clone"):
        await drv.clone("img-2", "base", "i-1-root", 32 * MiB)

    await drv.flatten("i-1-root")
    await drv.flatten("i-1-root")
    assert read_qcow2_header(root).backing_file == ""  # type: ignore[union-attr]
    assert holds(root, 0x5A)
    assert await drv.children("img-1", "base") == []
    await drv.delete_snapshot("img-1", "base")
    await drv.delete("img-1")
    await drv.delete("img-1")
    assert await drv.list() == ["i-1-root", "img-2"]


async def test_clone_of_an_unprotected_snapshot_is_an_independent_copy(drv: LocalDriver) -> None:
    await drv.create("vol-a", 16 * MiB)
    path = drv.root / "vol-a.qcow2"
    write(path, 0x11)
    await drv.snapshot("vol-a", "snap-1")
    write(path, 0x22)
    await drv.clone("vol-a", "snap-1", "vol-b", 32 * MiB)
    copy = drv.root / "vol-b.qcow2"
    assert holds(copy, 0x11)
    assert read_qcow2_header(copy).backing_file == ""  # type: ignore[union-attr]
    assert await drv.size("vol-b") == 32 * MiB
    assert await drv.children("vol-a", "snap-1") == []
    # `volume flatten` of it (issue #11) has nothing to copy: the file stays as it is, the snapshot can go
    before = copy.read_bytes()
    await drv.flatten("vol-b")
    assert copy.read_bytes() == before and holds(copy, 0x11)
    await drv.delete_snapshot("vol-a", "snap-1")
    with pytest.raises(NotFound):
        await drv.flatten("vol-missing")
    await drv.delete("vol-a")
    assert holds(copy, 0x11)
    with pytest.raises(NotFound):
        await drv.clone("vol-a", "snap-1", "vol-c", 16 * MiB)  # the volume is gone


async def test_an_older_snapshot_cannot_be_protected(drv: LocalDriver) -> None:
    await drv.create("vol-a", 16 * MiB)
    await drv.snapshot("vol-a", "snap-1")
    with pytest.raises(StorageError, match="only be protected when it is taken"):
        await drv.snapshot("vol-a", "snap-1", protect=True)
    await drv.snapshot("vol-a", "snap-2", protect=True)
    with pytest.raises(StorageError, match="already protected"):
        await drv.snapshot("vol-a", "snap-3", protect=True)
    with pytest.raises(InUse):
        await drv.rollback("vol-a", "snap-1")


async def test_a_volume_open_by_qemu_is_in_use(drv: LocalDriver) -> None:
    """A process holding QEMU's image lock (here ``qemu-io`` in the background) stands for a running guest."""
    await drv.create("vol-a", 16 * MiB)
    path = drv.root / "vol-a.qcow2"
    holder = open_in_background(path)
    try:
        with pytest.raises(InUse, match="running guest"):
            await drv.delete("vol-a")
        with pytest.raises(InUse):
            await drv.snapshot("vol-a", "snap-1")
        assert await drv.snapshots("vol-a") == []  # reading still works
    finally:
        close(holder)
    await drv.delete("vol-a")
    assert not await drv.exists("vol-a")


async def test_an_overlay_upload_is_refused(drv: LocalDriver, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(base), "1M")
    overlay = tmp_path / "overlay.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(overlay))
    with pytest.raises(StorageError, match="overlay"):
        await drv.import_file(overlay, "img-x")
    assert not await drv.exists("img-x")
