"""libvirt and QEMU use the RBD disks ``domain_for`` designs: a cephx secret defined through the compute driver, a
domain with an RBD volume and a file volume that libvirt validates, and a started domain whose QEMU opened the RBD
image through librbd (it reports the image's size), grows it live and hot-plugs a second one.

The guest boots nothing (a blank root disk: SeaBIOS finds no boot device and waits), which is enough: QEMU opens every
disk when it starts. Uses the tests' libvirtd on ``qemu:///system`` (scripts/start-libvirtd) and the run's Ceph.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from agent.compute.design import AttachedDisk, GuestSpec, disk_xml, domain_for
from agent.compute.xml import InstanceMetadata, IoTune
from agent.storage.driver import DiskSource
from agent.storage.rbd import RbdDriver

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed")

URI = "qemu:///system"
MiB = 1 << 20


@pytest.fixture(scope="module")
def conn() -> Iterator[object]:
    try:
        c = libvirt.open(URI)
    except libvirt.libvirtError as e:
        pytest.skip(f"cannot connect to {URI} (is libvirtd running? scripts/start-libvirtd): {e}")
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
async def compute(conn: object) -> AsyncIterator[object]:
    from agent.compute.libvirt_driver import LibvirtDriver

    drv = LibvirtDriver(URI)
    await drv.open(lambda _uuid: None)
    yield drv
    await drv.close()


@pytest.fixture
async def rbd(ceph_cluster) -> AsyncIterator[RbdDriver]:  # type: ignore[no-untyped-def]
    h = ceph_cluster
    drv = RbdDriver(h.pool, h.conf, h.keyring, h.user, [(h.address, h.mon_port)], str(uuid.uuid4()))
    made_before = set(await drv.list())
    yield drv
    for vol in set(await drv.list()) - made_before:
        if vol.startswith("lvt-"):
            await drv.delete(vol)


@pytest.fixture
async def secret(compute, rbd: RbdDriver) -> AsyncIterator[str]:  # type: ignore[no-untyped-def]
    match = re.search(r"key\s*=\s*(\S+)", rbd.keyring.read_text())
    assert match is not None
    usage = f"minicloud-test-{uuid.uuid4().hex[:8]}"
    await compute.define_secret(rbd.secret_uuid, usage, base64.b64decode(match.group(1)))
    await compute.define_secret(rbd.secret_uuid, usage, base64.b64decode(match.group(1)))  # idempotent
    yield rbd.secret_uuid
    await compute.undefine_secret(rbd.secret_uuid)
    await compute.undefine_secret(rbd.secret_uuid)


def _qcow2(path: Path, size: str) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def _spec(tmp_path: Path, volumes: tuple[AttachedDisk, ...]) -> GuestSpec:
    root = _qcow2(tmp_path / "root.qcow2", "16M")
    created = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return GuestSpec(
        uuid=str(uuid.uuid4()),
        domain_name=f"minicloud-test-{uuid.uuid4().hex[:12]}",
        virt_type="qemu",
        vcpus=1,
        memory_mib=128,
        root_disk=root,
        seed_iso=None,
        console_log=tmp_path / "console.log",
        volumes=volumes,
        metadata=InstanceMetadata(
            id="i-rbd", project="p-test", name="rbd", node="node-test", image="none", type="t", created=created
        ),
    )


def test_secret_is_private_and_holds_the_key(conn: object, secret: str) -> None:
    sec = conn.secretLookupByUUIDString(secret)  # type: ignore[attr-defined]
    xml = sec.XMLDesc(0)
    assert "ephemeral='no'" in xml and "private='yes'" in xml and "<usage type='ceph'>" in xml


async def test_domain_with_rbd_and_file_volumes_is_accepted(
    conn: object, rbd: RbdDriver, secret: str, tmp_path: Path
) -> None:
    vol = f"lvt-{uuid.uuid4().hex[:10]}"
    await rbd.create(vol, 32 * MiB)
    local = _qcow2(tmp_path / "vol-local.qcow2", "8M")
    volumes = (
        AttachedDisk(rbd.source(vol), "vdb", serial=vol, iotune=IoTune(read_iops_sec=500, write_iops_sec=200)),
        AttachedDisk(DiskSource(kind="file", path=str(local)), "vdc", serial="vol-local"),
    )
    spec = _spec(tmp_path, volumes)
    dom = conn.defineXMLFlags(domain_for(spec).to_xml(), libvirt.VIR_DOMAIN_DEFINE_VALIDATE)  # type: ignore[attr-defined]
    try:
        xml = dom.XMLDesc(0)
        assert f"<source protocol='rbd' name='{rbd.pool}/{vol}'>" in xml
        assert f"<secret type='ceph' uuid='{secret}'/>" in xml
        assert f"<serial>{vol}</serial>" in xml and "<read_iops_sec>500</read_iops_sec>" in xml
        assert f"<source file='{local}'/>" in xml
    finally:
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)


async def test_qemu_opens_grows_and_hot_plugs_rbd_volumes(  # type: ignore[no-untyped-def]
    conn: object, compute, rbd: RbdDriver, secret: str, tmp_path: Path
) -> None:
    vol, extra = f"lvt-{uuid.uuid4().hex[:10]}", f"lvt-{uuid.uuid4().hex[:10]}"
    await rbd.create(vol, 32 * MiB)
    await rbd.create(extra, 16 * MiB)
    spec = _spec(tmp_path, (AttachedDisk(rbd.source(vol), "vdb", serial=vol),))
    await compute.define(domain_for(spec).to_xml())
    try:
        await compute.start(spec.uuid)
        dom = conn.lookupByUUIDString(spec.uuid)  # type: ignore[attr-defined]
        assert dom.isActive()
        assert dom.blockInfo("vdb")[0] == 32 * MiB  # QEMU's view: librbd opened the image

        await rbd.resize(vol, 64 * MiB)
        await compute.block_resize(spec.uuid, "vdb", 64 * MiB)
        assert dom.blockInfo("vdb")[0] == 64 * MiB

        plugged = disk_xml(AttachedDisk(rbd.source(extra), "vdc", serial=extra))
        await compute.attach_device(spec.uuid, plugged)
        assert dom.blockInfo("vdc")[0] == 16 * MiB
        live = await compute.live_xml(spec.uuid)
        assert live is not None and f"<serial>{extra}</serial>" in live  # the live domain has the plugged disk
        await compute.detach_device(spec.uuid, plugged)
    finally:
        await compute.destroy(spec.uuid)
        assert await compute.live_xml(spec.uuid) is None  # not running: no live definition
        await compute.undefine(spec.uuid)
