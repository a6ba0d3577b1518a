"""Volume drivers without a host: the fake (the contract's reference), the registry, qcow2 header reading, the parts of
the local driver that need no ``qemu-img``, and the compute fake's disks and secrets."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from agent.compute.design import AttachedDisk, disk_xml
from agent.compute.driver import DriverError, FakeDriver
from agent.storage.driver import (
    DiskSource,
    FakeVolumeDriver,
    InUse,
    NotFound,
    StorageError,
    make_volume_driver,
    probe_image,
    read_qcow2_header,
)
from agent.storage.local import LocalDriver
from agent.storage.rbd import RbdDriver

GiB = 1 << 30


async def test_fake_create_is_idempotent_for_the_same_size_only() -> None:
    d = FakeVolumeDriver()
    await d.create("vol-1", GiB)
    await d.create("vol-1", GiB)
    with pytest.raises(StorageError, match="already exists"):
        await d.create("vol-1", 2 * GiB)
    assert await d.list() == ["vol-1"] and await d.size("vol-1") == GiB
    assert await d.size("vol-2") is None and not await d.exists("vol-2")


async def test_fake_resize_grows_only() -> None:
    d = FakeVolumeDriver()
    await d.create("vol-1", GiB)
    await d.resize("vol-1", 2 * GiB)
    await d.resize("vol-1", 2 * GiB)
    with pytest.raises(StorageError, match="only grow"):
        await d.resize("vol-1", GiB)
    with pytest.raises(NotFound):
        await d.resize("vol-9", GiB)


async def test_fake_image_clone_children_in_use_and_flatten(tmp_path: Path) -> None:
    d = FakeVolumeDriver()
    src = tmp_path / "img.raw"
    src.write_bytes(b"image")
    assert await d.import_file(src, "img-1") == 5
    assert await d.import_file(src, "img-1") == 5
    await d.snapshot("img-1", "base", protect=True)
    await d.snapshot("img-1", "base", protect=True)
    with pytest.raises(NotFound):
        await d.clone("img-1", "nope", "i-1-root", GiB)
    await d.clone("img-1", "base", "i-1-root", GiB)
    await d.clone("img-1", "base", "i-1-root", GiB)
    assert d.read("i-1-root") == b"image" and await d.size("i-1-root") == GiB
    await d.create("vol-2", GiB)
    with pytest.raises(StorageError, match="not a clone"):
        await d.clone("img-1", "base", "vol-2", GiB)
    assert await d.children("img-1", "base") == ["i-1-root"]
    with pytest.raises(InUse, match="i-1-root"):
        await d.delete_snapshot("img-1", "base")
    with pytest.raises(InUse, match="i-1-root"):
        await d.delete("img-1")
    await d.flatten("i-1-root")
    assert await d.children("img-1", "base") == []
    await d.delete("img-1")
    await d.delete("img-1")
    assert await d.list() == ["i-1-root", "vol-2"]


async def test_fake_snapshot_rollback_and_in_use() -> None:
    d = FakeVolumeDriver()
    await d.create("vol-1", GiB)
    d.write("vol-1", b"one")
    await d.snapshot("vol-1", "snap-1")
    d.write("vol-1", b"two")
    d.in_use.add("vol-1")
    with pytest.raises(InUse):
        await d.rollback("vol-1", "snap-1")
    with pytest.raises(InUse):
        await d.delete("vol-1")
    d.in_use.clear()
    await d.rollback("vol-1", "snap-1")
    assert d.read("vol-1") == b"one"
    with pytest.raises(NotFound):
        await d.rollback("vol-1", "snap-9")
    assert await d.snapshots("vol-1") == ["snap-1"]
    await d.delete_snapshot("vol-1", "snap-1")
    await d.delete_snapshot("vol-1", "snap-1")
    await d.delete_snapshot("vol-9", "snap-1")
    assert await d.snapshots("vol-1") == []


async def test_fake_fail_next_and_calls() -> None:
    d = FakeVolumeDriver()
    d.fail_next.add("create")
    with pytest.raises(StorageError, match="fake create failure"):
        await d.create("vol-1", GiB)
    await d.create("vol-1", GiB)
    assert d.calls == [("create", "vol-1", GiB), ("create", "vol-1", GiB)]


def test_registry_builds_each_driver(tmp_path: Path) -> None:
    assert isinstance(make_volume_driver("fake"), FakeVolumeDriver)
    local = make_volume_driver("local", root=tmp_path)
    assert isinstance(local, LocalDriver) and local.name == "local"
    ceph = make_volume_driver(
        "ceph",
        pool="mc",
        conf=tmp_path / "ceph.conf",
        keyring=tmp_path / "keyring",
        user="minicloud",
        hosts=[("10.0.0.1", 3300)],
        secret_uuid="u-1",
    )
    assert isinstance(ceph, RbdDriver) and ceph.name == "ceph"
    assert ceph.source("vol-1") == DiskSource(
        kind="rbd", format="raw", pool="mc", image="vol-1", hosts=(("10.0.0.1", 3300),), user="minicloud",
        secret_uuid="u-1",
    )  # fmt: skip
    with pytest.raises(StorageError, match="no volume driver 'nfs'"):
        make_volume_driver("nfs")


def _qcow2_header(size: int, backing: bytes = b"", incompatible: int = 0) -> bytes:
    head = bytearray(112)
    head[0:4] = b"QFI\xfb"
    struct.pack_into(">I", head, 4, 3)
    if backing:
        struct.pack_into(">QI", head, 8, len(head), len(backing))
    struct.pack_into(">Q", head, 24, size)
    struct.pack_into(">Q", head, 72, incompatible)
    return bytes(head) + backing


def test_qcow2_headers_are_read_without_qemu_img(tmp_path: Path) -> None:
    plain, overlay, raw = tmp_path / "a.qcow2", tmp_path / "b.qcow2", tmp_path / "c.raw"
    plain.write_bytes(_qcow2_header(5 * GiB))
    overlay.write_bytes(_qcow2_header(GiB, backing=b"img-1.qcow2"))
    raw.write_bytes(b"\0" * 4096)
    assert read_qcow2_header(plain).size == 5 * GiB  # type: ignore[union-attr]
    assert read_qcow2_header(overlay).backing_file == "img-1.qcow2"  # type: ignore[union-attr]
    assert read_qcow2_header(raw) is None
    assert probe_image(plain) == "qcow2" and probe_image(raw) == "raw"
    with pytest.raises(StorageError, match="overlay"):
        probe_image(overlay)
    external = tmp_path / "d.qcow2"
    external.write_bytes(_qcow2_header(GiB, incompatible=0b100))
    with pytest.raises(StorageError, match="external"):
        probe_image(external)
    with pytest.raises(StorageError, match="cannot read"):
        probe_image(tmp_path / "missing")


async def test_local_driver_lists_whole_volumes_only(tmp_path: Path) -> None:
    d = LocalDriver(tmp_path / "pool")
    assert await d.list() == []
    d.root.mkdir()
    (d.root / "vol-1.qcow2").write_bytes(_qcow2_header(GiB))
    (d.root / "vol-2.qcow2.part").write_bytes(b"")
    (d.root / "img-1.frozen").write_text("base\n")
    assert await d.list() == ["vol-1"]
    assert await d.size("vol-1") == GiB and await d.size("vol-2") is None
    assert d.source("vol-1") == DiskSource(kind="file", path=str(d.root / "vol-1.qcow2"), format="qcow2")


@pytest.mark.parametrize("name", ["", "../etc", "a/b", "vol-1.qcow2", ".hidden", "x@y"])
async def test_names_that_could_escape_or_collide_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(StorageError, match="not valid"):
        await LocalDriver(tmp_path).exists(name)
    if name != "vol-1.qcow2":
        with pytest.raises(StorageError, match="not valid"):
            RbdDriver("mc", Path("c"), Path("k"), "admin", (), "u").source(name)


# --- the compute fake's side: disks and secrets ----------------------------------------------------------------------


DOMAIN = (
    "<domain><name>d</name><uuid>u-1</uuid><devices>"
    '<disk type="file" device="disk"><source file="/r" /><target dev="vda" bus="virtio" /></disk>'
    "</devices></domain>"
)


async def test_fake_compute_driver_hot_plugs_disks_and_resizes_them() -> None:
    drv = FakeDriver()
    await drv.define(DOMAIN)
    await drv.start("u-1")
    vol = disk_xml(AttachedDisk(DiskSource(kind="file", path="/s/vol-1.qcow2"), "vdb", serial="vol-1"))
    await drv.attach_device("u-1", vol)
    await drv.block_resize("u-1", "vdb", 2 * GiB)
    assert drv.block_sizes == {("u-1", "vdb"): 2 * GiB}
    with pytest.raises(DriverError, match="vdc"):
        await drv.block_resize("u-1", "vdc", GiB)
    # a detach names the disk by its serial alone, or by its target alone
    await drv.detach_device("u-1", "<disk><serial>vol-1</serial></disk>")
    assert "vol-1" not in (await drv.domain("u-1")).xml  # type: ignore[union-attr]
    await drv.attach_device("u-1", vol)
    await drv.detach_device("u-1", '<disk><target dev="vdb" /></disk>')
    xml = (await drv.domain("u-1")).xml  # type: ignore[union-attr]
    assert "vdb" not in xml and "vda" in xml


async def test_fake_compute_driver_secrets_replace_by_usage() -> None:
    drv = FakeDriver()
    await drv.define_secret("s-1", "client.minicloud", b"k1")
    await drv.define_secret("s-1", "client.minicloud", b"k2")
    assert drv.secrets == {"s-1": ("client.minicloud", b"k2")}
    await drv.define_secret("s-2", "client.minicloud", b"k3")
    assert drv.secrets == {"s-2": ("client.minicloud", b"k3")}
    await drv.undefine_secret("s-2")
    await drv.undefine_secret("s-2")
    assert drv.secrets == {}
