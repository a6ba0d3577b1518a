"""libvirt accepts the domain of a GPU instance: one ``<hostdev>`` per PCI function, UEFI firmware. Defined and
undefined only (no GPU on this machine: starting would need the device bound to vfio-pci). Defined as the compute
driver defines it, with ``VIR_DOMAIN_DEFINE_VALIDATE``: libvirt checks the XML against its RNG schema and then the
QEMU driver's capabilities; a hostdev the schema does not allow is refused. The host addresses need not exist to
define."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.compute.design import OVMF_CODE, OVMF_VARS_TEMPLATE, domain_for
from agent.compute.driver import DriverError
from agent.compute.xml import read_metadata
from tests.integration.test_libvirt_define import URI, _spec, conn, libvirt  # noqa: F401 (fixture)

GPU_FUNCTIONS = ("0000:3b:00.0", "0000:3b:00.1")


@pytest.fixture
async def compute(conn: object) -> AsyncIterator[object]:  # noqa: F811
    from agent.compute.libvirt_driver import LibvirtDriver

    drv = LibvirtDriver(URI)
    await drv.open(lambda _uuid: None)
    yield drv
    await drv.close()


def _uefi(tmp_path: Path) -> dict[str, object]:
    if not (OVMF_CODE.exists() and OVMF_VARS_TEMPLATE.exists()):
        pytest.skip(f"{OVMF_CODE} or {OVMF_VARS_TEMPLATE} is missing (Debian package ovmf)")
    return {"firmware": "uefi", "nvram": tmp_path / "nvram.fd"}


def _undefine(c: object, domain_uuid: str) -> None:
    try:
        dom = c.lookupByUUIDString(domain_uuid)  # type: ignore[attr-defined]
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return
        raise
    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)


async def test_a_domain_with_gpu_hostdevs_is_accepted(conn: object, compute: Any, tmp_path: Path) -> None:  # noqa: F811
    spec = _spec(tmp_path, hostdevs=GPU_FUNCTIONS, **_uefi(tmp_path))
    await compute.define(domain_for(spec).to_xml())
    try:
        dom = conn.lookupByUUIDString(spec.uuid)  # type: ignore[attr-defined]
        assert dom.name() == spec.domain_name and not dom.isActive()
        xml = dom.XMLDesc(0)
        assert read_metadata(xml) == spec.metadata
    finally:
        _undefine(conn, spec.uuid)
    assert xml.count("<hostdev mode='subsystem' type='pci' managed='no'>") == 2
    assert "<address domain='0x0000' bus='0x3b' slot='0x00' function='0x0'/>" in xml
    assert "<address domain='0x0000' bus='0x3b' slot='0x00' function='0x1'/>" in xml


async def test_an_invalid_hostdev_is_refused_by_the_schema(conn: object, compute: Any, tmp_path: Path) -> None:  # noqa: F811
    """A misspelt attribute of a hostdev's address: without validation libvirt would drop it and define the domain."""
    spec = _spec(tmp_path, hostdevs=GPU_FUNCTIONS, **_uefi(tmp_path))
    good = 'bus="0x3b" slot="0x00" function="0x1"'
    xml = domain_for(spec).to_xml()
    assert xml.count(good) == 1
    bad = xml.replace(good, 'bus="0x3b" slot="0x00" function="0x1" funcion="0x1"')
    try:
        with pytest.raises(DriverError, match="failed to validate against schema"):
            await compute.define(bad)
        with pytest.raises(libvirt.libvirtError) as refused:
            conn.defineXMLFlags(bad, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)  # type: ignore[attr-defined]
        assert refused.value.get_error_code() == libvirt.VIR_ERR_XML_INVALID_SCHEMA
        with pytest.raises(libvirt.libvirtError):
            conn.lookupByUUIDString(spec.uuid)  # type: ignore[attr-defined]
    finally:
        _undefine(conn, spec.uuid)
