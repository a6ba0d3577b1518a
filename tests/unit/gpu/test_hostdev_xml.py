"""Golden XML of the ``<hostdev>`` a GPU function gets, and of a GPU guest's devices: one hostdev per function of
each GPU, after the NICs, ``managed='no'`` (the node binds them to vfio-pci itself)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.compute.design import domain_for
from agent.compute.xml import Hostdev
from tests.unit.agent.test_domain_xml import DEVICES_TAIL, ROOT_DISK, _part, _spec, render

GPU_FN0 = (
    '<hostdev mode="subsystem" type="pci" managed="no"><source>'
    '<address domain="0x0000" bus="0x3b" slot="0x00" function="0x0" /></source></hostdev>'
)
GPU_FN1 = (
    '<hostdev mode="subsystem" type="pci" managed="no"><source>'
    '<address domain="0x0000" bus="0x3b" slot="0x00" function="0x1" /></source></hostdev>'
)


def test_hostdev_renders_golden_xml() -> None:
    assert render(Hostdev("0000:3b:00.0").to_element()) == GPU_FN0
    assert render(Hostdev("0001:af:1f.7", managed=True).to_element()) == (
        '<hostdev mode="subsystem" type="pci" managed="yes"><source>'
        '<address domain="0x0001" bus="0xaf" slot="0x1f" function="0x7" /></source></hostdev>'
    )


@pytest.mark.parametrize("bad", ["3b:00.0", "0000:3b:00", "0000:zz:00.0", ""])
def test_hostdev_refuses_what_is_not_a_pci_address(bad: str) -> None:
    with pytest.raises(ValueError, match="not a PCI address"):
        Hostdev(bad).to_element()


def test_a_gpu_guest_gets_a_hostdev_for_every_function_on_uefi() -> None:
    spec = _spec(hostdevs=("0000:3b:00.0", "0000:3b:00.1"), firmware="uefi", nvram=Path("/i/nvram.fd"))
    domain = domain_for(spec)
    assert _part(domain, "devices") == f"<devices>{ROOT_DISK}{GPU_FN0}{GPU_FN1}{DEVICES_TAIL}</devices>"
    assert "OVMF_CODE_4M.fd" in _part(domain, "os")


def test_a_guest_without_gpus_has_no_hostdev() -> None:
    assert "hostdev" not in domain_for(_spec()).to_xml()
