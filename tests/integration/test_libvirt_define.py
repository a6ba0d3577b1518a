"""libvirt itself accepts the domains ``domain_for`` designs: each is defined on ``qemu:///system`` and undefined.

Defining validates the XML against libvirt's schema and the QEMU driver's capabilities (machine, firmware, devices)
without starting a guest; boot tests live elsewhere. Each test uses a unique domain name and always undefines it.
"""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.compute.design import OVMF_CODE, OVMF_VARS_TEMPLATE, GuestSpec, Nic, domain_for, mac_for
from agent.compute.seed import meta_data, network_config_dhcp, write_nocloud_seed
from agent.compute.xml import InstanceMetadata, read_metadata

libvirt = pytest.importorskip("libvirt", reason="libvirt-python is not installed")

URI = "qemu:///system"


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


def _qcow2(path: Path) -> Path:
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        pytest.skip("qemu-img is not installed (Debian package qemu-utils)")
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    return path


def _spec(tmp_path: Path, **changes: object) -> GuestSpec:
    instance_id = f"i-{uuid.uuid4().hex[:12]}"
    values: dict[str, object] = {
        "uuid": str(uuid.uuid4()),
        "domain_name": f"minicloud-test-{uuid.uuid4().hex[:12]}",
        "virt_type": "qemu",
        "vcpus": 1,
        "memory_mib": 128,
        "root_disk": _qcow2(tmp_path / "root.qcow2"),
        "seed_iso": None,
        "console_log": tmp_path / "console.log",
        "metadata": InstanceMetadata(
            id=instance_id,
            project="p-test",
            name="define-test",
            node="node-test",
            image="none",
            type="t.tiny",
            created=dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        ),
    }
    values.update(changes)
    return GuestSpec(**values)  # type: ignore[arg-type]


def _define_and_undefine(conn: object, spec: GuestSpec) -> str:
    """Define the designed domain, check that libvirt kept it (and our metadata), undefine it; returns libvirt's XML."""
    dom = conn.defineXML(domain_for(spec).to_xml())  # type: ignore[attr-defined]
    try:
        assert dom.name() == spec.domain_name
        assert dom.UUIDString() == spec.uuid
        assert not dom.isActive()
        xml = dom.XMLDesc(0)
        assert read_metadata(xml) == spec.metadata
        return xml
    finally:
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)


def test_direct_kernel_tcg_domain_is_accepted(conn: object, tmp_path: Path) -> None:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(b"\0" * 4096)
    initrd.write_bytes(b"\0" * 4096)
    seed = tmp_path / "seed.iso"
    write_nocloud_seed(seed, meta_data=meta_data("i-1", "h"), user_data=b"", network_config=network_config_dhcp())
    spec = _spec(tmp_path, kernel=kernel, initrd=initrd, cmdline="panic=-1", seed_iso=seed)
    xml = _define_and_undefine(conn, spec)
    assert "<cmdline>console=ttyS0 panic=-1</cmdline>" in xml
    assert f"<kernel>{kernel}</kernel>" in xml
    assert "<target dev='sda' bus='sata'/>" in xml


def test_bios_disk_domain_with_seed_and_nic_is_accepted(conn: object, tmp_path: Path) -> None:
    seed = tmp_path / "seed.iso"
    write_nocloud_seed(seed, meta_data=meta_data("i-1", "h"), user_data=b"")
    # Defining does not need the bridge to exist; starting does (the network driver creates it first).
    mac = mac_for("i-define-test")
    spec = _spec(tmp_path, seed_iso=seed, nics=(Nic(mac, "mctestbr0"),))
    xml = _define_and_undefine(conn, spec)
    assert "<boot dev='hd'/>" in xml
    assert f"<mac address='{mac}'/>" in xml
    assert "<controller type='usb' index='0' model='none'/>" in xml


def test_uefi_domain_is_accepted(conn: object, tmp_path: Path) -> None:
    if not (OVMF_CODE.exists() and OVMF_VARS_TEMPLATE.exists()):
        pytest.skip(f"{OVMF_CODE} or {OVMF_VARS_TEMPLATE} is missing (Debian package ovmf)")
    spec = _spec(tmp_path, firmware="uefi", nvram=tmp_path / "nvram.fd")
    xml = _define_and_undefine(conn, spec)
    assert f"<loader readonly='yes' type='pflash'>{OVMF_CODE}</loader>" in xml
    assert f"<nvram template='{OVMF_VARS_TEMPLATE}'>{tmp_path / 'nvram.fd'}</nvram>" in xml


def test_kvm_design_is_accepted_when_kvm_is_available(conn: object, tmp_path: Path) -> None:
    """Only defined, never started: /dev/kvm here is software KVM on which guests do not boot."""
    caps = conn.getCapabilities()  # type: ignore[attr-defined]
    if "<domain type='kvm'" not in caps:
        pytest.skip("libvirt reports no kvm domain type on this host")
    xml = _define_and_undefine(conn, _spec(tmp_path, virt_type="kvm"))
    assert "<cpu mode='host-passthrough'" in xml
