"""libvirt accepts the domain of a GPU instance: one ``<hostdev>`` per PCI function, UEFI firmware. Defined and
undefined only (no GPU on this machine: starting would need the device bound to vfio-pci); defining validates the
XML against libvirt's schema and the QEMU driver. The host addresses need not exist to define."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.compute.design import OVMF_CODE, OVMF_VARS_TEMPLATE
from tests.integration.test_libvirt_define import _define_and_undefine, _spec, conn  # noqa: F401 (fixture)


def test_a_domain_with_gpu_hostdevs_is_accepted(conn: object, tmp_path: Path) -> None:  # noqa: F811
    if not (OVMF_CODE.exists() and OVMF_VARS_TEMPLATE.exists()):
        pytest.skip(f"{OVMF_CODE} or {OVMF_VARS_TEMPLATE} is missing (Debian package ovmf)")
    spec = _spec(tmp_path, hostdevs=("0000:3b:00.0", "0000:3b:00.1"), firmware="uefi", nvram=tmp_path / "nvram.fd")
    xml = _define_and_undefine(conn, spec)
    assert xml.count("<hostdev mode='subsystem' type='pci' managed='no'>") == 2
    assert "<address domain='0x0000' bus='0x3b' slot='0x00' function='0x0'/>" in xml
    assert "<address domain='0x0000' bus='0x3b' slot='0x00' function='0x1'/>" in xml
