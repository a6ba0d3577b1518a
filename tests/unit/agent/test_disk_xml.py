"""Golden XML for volumes: RBD network disks, file disks with serial and I/O limits, and where ``domain_for`` puts them."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from agent.compute.design import AttachedDisk, GuestSpec, disk_xml, domain_for
from agent.compute.xml import Disk, InstanceMetadata, IoTune, RbdDisk
from agent.storage.driver import DiskSource

SECRET = "0b7d3c38-5d0a-4f57-9f77-0f0c6d1c2a11"
RBD = DiskSource(
    kind="rbd",
    format="raw",
    pool="mc",
    image="vol-abc",
    hosts=(("10.0.0.1", 3300), ("10.0.0.2", 3300)),
    user="minicloud",
    secret_uuid=SECRET,
)
RBD_XML = (
    '<disk type="network" device="disk">'
    '<driver name="qemu" type="raw" cache="none" discard="unmap" />'
    '<source protocol="rbd" name="mc/vol-abc">'
    '<host name="10.0.0.1" port="3300" /><host name="10.0.0.2" port="3300" /></source>'
    f'<auth username="minicloud"><secret type="ceph" uuid="{SECRET}" /></auth>'
    '<target dev="vdb" bus="virtio" />'
    "<serial>vol-abc</serial>"
    "</disk>"
)
META = InstanceMetadata(
    id="i-0123", project="p-demo", name="web-1", node="node-a", image="debian-12", type="m1.small",
    created="2026-11-22T10:30:00.000Z",
)  # fmt: skip


def render(el: ET.Element) -> str:
    return ET.tostring(el, encoding="unicode")


def test_rbd_disk_is_golden() -> None:
    disk = RbdDisk("mc", "vol-abc", RBD.hosts, "vdb", username="minicloud", secret_uuid=SECRET, serial="vol-abc")
    assert render(disk.to_element()) == RBD_XML


def test_iotune_renders_only_the_limits_set() -> None:
    tune = IoTune(read_iops_sec=500, write_iops_sec=200, total_bytes_sec=10_000_000, read_bytes_sec=0)
    assert render(tune.to_element()) == (
        "<iotune><total_bytes_sec>10000000</total_bytes_sec>"
        "<read_iops_sec>500</read_iops_sec><write_iops_sec>200</write_iops_sec></iotune>"
    )
    assert not IoTune() and not IoTune(read_iops_sec=0)


@pytest.mark.parametrize(
    "limits",
    [{"total_iops_sec": 100, "read_iops_sec": 10}, {"total_bytes_sec": 1, "write_bytes_sec": 1}, {"read_iops_sec": -1}],
)
def test_iotune_refuses_what_libvirt_refuses(limits: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="iotune"):
        IoTune(**limits)


def test_file_disk_with_serial_iotune_and_cache_is_golden() -> None:
    disk = Disk(
        "/p/vol-1.qcow2", "vdc", discard="unmap", cache="none", serial="vol-1", iotune=IoTune(total_iops_sec=100)
    )
    assert render(disk.to_element()) == (
        '<disk type="file" device="disk"><driver name="qemu" type="qcow2" cache="none" discard="unmap" />'
        '<source file="/p/vol-1.qcow2" /><target dev="vdc" bus="virtio" />'
        "<iotune><total_iops_sec>100</total_iops_sec></iotune><serial>vol-1</serial></disk>"
    )


def test_disk_xml_for_hot_plug() -> None:
    assert disk_xml(AttachedDisk(RBD, "vdb", serial="vol-abc")) == RBD_XML
    local = DiskSource(kind="file", path="/s/pool-1/vol-2.qcow2")
    assert disk_xml(AttachedDisk(local, "vdc", serial="vol-2", iotune=IoTune(read_bytes_sec=1024))) == (
        '<disk type="file" device="disk"><driver name="qemu" type="qcow2" discard="unmap" />'
        '<source file="/s/pool-1/vol-2.qcow2" /><target dev="vdc" bus="virtio" />'
        "<iotune><read_bytes_sec>1024</read_bytes_sec></iotune><serial>vol-2</serial></disk>"
    )


@pytest.mark.parametrize(
    "source",
    [
        dataclasses.replace(RBD, secret_uuid=""),
        dataclasses.replace(RBD, hosts=()),
        DiskSource(kind="file"),
        DiskSource(kind="file", path="/x", format="vmdk"),
    ],
)
def test_incomplete_sources_are_refused(source: DiskSource) -> None:
    with pytest.raises(ValueError, match="vdb"):
        disk_xml(AttachedDisk(source, "vdb"))


def _spec(**changes: object) -> GuestSpec:
    spec = GuestSpec(
        uuid="6f1c3d6e-8f55-4a38-9d4e-0d7c2e8f9a10",
        domain_name="mc-i-0123",
        virt_type="qemu",
        vcpus=1,
        memory_mib=256,
        root_disk=Path("/i/root.qcow2"),
        seed_iso=Path("/i/seed.iso"),
        console_log=Path("/i/console.log"),
        metadata=META,
    )
    return dataclasses.replace(spec, **changes)  # type: ignore[arg-type]


def _disks(spec: GuestSpec) -> list[str]:
    devices = domain_for(spec).to_element().find("devices")
    assert devices is not None
    return [render(d) for d in devices.findall("disk")]


def test_volumes_follow_the_root_disk_and_precede_the_seed() -> None:
    local = DiskSource(kind="file", path="/s/vol-2.qcow2")
    spec = _spec(volumes=(AttachedDisk(RBD, "vdb", serial="vol-abc"), AttachedDisk(local, "vdc", serial="vol-2")))
    disks = _disks(spec)
    assert len(disks) == 4
    assert '<source file="/i/root.qcow2" /><target dev="vda"' in disks[0]
    assert disks[1] == RBD_XML
    assert '<source file="/s/vol-2.qcow2" /><target dev="vdc" bus="virtio" /><serial>vol-2</serial>' in disks[2]
    assert 'device="cdrom"' in disks[3]


def test_root_disk_from_a_driver_source() -> None:
    root = dataclasses.replace(RBD, image="i-0123-root")
    spec = _spec(root_disk=root, root_serial="i-0123-root", root_iotune=IoTune(total_iops_sec=1000), seed_iso=None)
    assert _disks(spec) == [
        '<disk type="network" device="disk">'
        '<driver name="qemu" type="raw" cache="none" discard="unmap" />'
        '<source protocol="rbd" name="mc/i-0123-root">'
        '<host name="10.0.0.1" port="3300" /><host name="10.0.0.2" port="3300" /></source>'
        f'<auth username="minicloud"><secret type="ceph" uuid="{SECRET}" /></auth>'
        '<target dev="vda" bus="virtio" />'
        "<iotune><total_iops_sec>1000</total_iops_sec></iotune>"
        "<serial>i-0123-root</serial></disk>"
    ]
    raw_file = DiskSource(kind="file", path="/s/i-0123-root.img", format="raw")
    assert _disks(_spec(root_disk=raw_file, seed_iso=None)) == [
        '<disk type="file" device="disk"><driver name="qemu" type="raw" discard="unmap" />'
        '<source file="/s/i-0123-root.img" /><target dev="vda" bus="virtio" /></disk>'
    ]


def test_two_disks_on_one_target_are_refused() -> None:
    with pytest.raises(ValueError, match="vdb"):
        domain_for(_spec(volumes=(AttachedDisk(RBD, "vdb"), AttachedDisk(RBD, "vdb"))))
    with pytest.raises(ValueError, match="vda"):
        domain_for(_spec(volumes=(AttachedDisk(RBD, "vda"),)))
