"""Golden XML for every libvirt element renderer, and the guest designs ``domain_for`` makes."""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from agent.compute.design import GuestSpec, Nic, domain_for, kernel_cmdline, mac_for
from agent.compute.xml import (
    NS,
    Clock,
    Console,
    Controller,
    Cpu,
    Disk,
    Domain,
    Features,
    InstanceMetadata,
    Interface,
    Loader,
    MemBalloon,
    MetadataError,
    Nvram,
    Os,
    Rng,
    Serial,
    Timer,
    Vcpu,
    read_metadata,
)

CREATED = "2026-11-22T10:30:00.000Z"
META = InstanceMetadata(
    id="i-0123", project="p-demo", name="web-1", node="node-a", image="debian-12", type="m1.small", created=CREATED
)
NSDECL = f'xmlns:minicloud="{NS}"'
META_XML = (
    f"<minicloud:instance {NSDECL}>"
    "<minicloud:id>i-0123</minicloud:id>"
    "<minicloud:project>p-demo</minicloud:project>"
    "<minicloud:name>web-1</minicloud:name>"
    "<minicloud:node>node-a</minicloud:node>"
    "<minicloud:image>debian-12</minicloud:image>"
    "<minicloud:type>m1.small</minicloud:type>"
    "<minicloud:created>2026-11-22T10:30:00.000Z</minicloud:created>"
    "</minicloud:instance>"
)


def render(el: ET.Element) -> str:
    return ET.tostring(el, encoding="unicode")


# --- one golden per element ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (Vcpu(4), "<vcpu>4</vcpu>"),
        (Vcpu(4, current=2), '<vcpu current="2">4</vcpu>'),
        (
            Loader("/usr/share/OVMF/OVMF_CODE_4M.fd"),
            '<loader readonly="yes" type="pflash">/usr/share/OVMF/OVMF_CODE_4M.fd</loader>',
        ),
        (Loader("/fw.fd", secure=False), '<loader readonly="yes" type="pflash" secure="no">/fw.fd</loader>'),
        (Nvram("/i/nvram.fd", template="/t.fd"), '<nvram template="/t.fd">/i/nvram.fd</nvram>'),
        (Nvram("/i/nvram.fd"), "<nvram>/i/nvram.fd</nvram>"),
        (Os(boot=("hd",)), '<os><type arch="x86_64" machine="q35">hvm</type><boot dev="hd" /></os>'),
        (
            Os(kernel="/k", initrd="/i", cmdline="console=ttyS0 quiet"),
            '<os><type arch="x86_64" machine="q35">hvm</type>'
            "<kernel>/k</kernel><initrd>/i</initrd><cmdline>console=ttyS0 quiet</cmdline></os>",
        ),
        (
            Os(loader=Loader("/c.fd"), nvram=Nvram("/n.fd", "/v.fd"), boot=("hd", "cdrom")),
            '<os><type arch="x86_64" machine="q35">hvm</type>'
            '<loader readonly="yes" type="pflash">/c.fd</loader><nvram template="/v.fd">/n.fd</nvram>'
            '<boot dev="hd" /><boot dev="cdrom" /></os>',
        ),
        (Features(), "<features><acpi /><apic /></features>"),
        (Features(acpi=False), "<features><apic /></features>"),
        (Cpu("host-passthrough"), '<cpu mode="host-passthrough" />'),
        (Cpu("maximum"), '<cpu mode="maximum" />'),
        (
            Cpu("custom", model="qemu64", check="none"),
            '<cpu mode="custom" check="none"><model fallback="forbid">qemu64</model></cpu>',
        ),
        (Timer("rtc", tickpolicy="catchup"), '<timer name="rtc" tickpolicy="catchup" />'),
        (Timer("hpet", present=False), '<timer name="hpet" present="no" />'),
        (Clock(), '<clock offset="utc" />'),
        (Clock(timers=(Timer("pit", "delay"),)), '<clock offset="utc"><timer name="pit" tickpolicy="delay" /></clock>'),
        (
            Disk("/i/root.qcow2", "vda", discard="unmap"),
            '<disk type="file" device="disk"><driver name="qemu" type="qcow2" discard="unmap" />'
            '<source file="/i/root.qcow2" /><target dev="vda" bus="virtio" /></disk>',
        ),
        (
            Disk("/i/seed.iso", "sda", "sata", device="cdrom", driver_type="raw", readonly=True),
            '<disk type="file" device="cdrom"><driver name="qemu" type="raw" />'
            '<source file="/i/seed.iso" /><target dev="sda" bus="sata" /><readonly /></disk>',
        ),
        (
            Interface("52:54:00:aa:bb:cc", "mcbr0"),
            '<interface type="bridge"><mac address="52:54:00:aa:bb:cc" /><source bridge="mcbr0" />'
            '<model type="virtio" /></interface>',
        ),
        (
            Interface("52:54:00:aa:bb:cc", "mcbr0", model="e1000e", target_dev="mctap0"),
            '<interface type="bridge"><mac address="52:54:00:aa:bb:cc" /><source bridge="mcbr0" />'
            '<target dev="mctap0" /><model type="e1000e" /></interface>',
        ),
        (
            Serial("/i/console.log"),
            '<serial type="file"><source path="/i/console.log" /><target port="0" /></serial>',
        ),
        (
            Serial("/i/console.log", append=True),
            '<serial type="file"><source path="/i/console.log" append="on" /><target port="0" /></serial>',
        ),
        (
            Console("/i/console.log", append=True),
            '<console type="file"><source path="/i/console.log" append="on" />'
            '<target type="serial" port="0" /></console>',
        ),
        (Controller("usb", "none"), '<controller type="usb" model="none" />'),
        (Controller("pci", "pcie-root-port", index=7), '<controller type="pci" index="7" model="pcie-root-port" />'),
        (MemBalloon(), '<memballoon model="virtio" />'),
        (MemBalloon(stats_period=10), '<memballoon model="virtio"><stats period="10" /></memballoon>'),
        (Rng(), '<rng model="virtio"><backend model="random">/dev/urandom</backend></rng>'),
        (META, META_XML),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, str) else "",
)
def test_element_renders_golden_xml(obj: object, expected: str) -> None:
    assert render(obj.to_element()) == expected  # type: ignore[attr-defined]


def test_text_and_attributes_are_escaped_not_concatenated() -> None:
    disk = Disk("/i/a'b\"<c>&.qcow2", "vda")
    assert '<source file="/i/a\'b&quot;&lt;c&gt;&amp;.qcow2" />' in render(disk.to_element())
    assert ET.fromstring(render(disk.to_element())).find("source").get("file") == "/i/a'b\"<c>&.qcow2"  # type: ignore[union-attr]


def test_domain_renders_golden_pretty_xml() -> None:
    domain = Domain(
        type="qemu",
        name="mc-i-0123",
        uuid="6f1c3d6e-8f55-4a38-9d4e-0d7c2e8f9a10",
        memory_kib=131072,
        vcpu=Vcpu(1),
        os=Os(boot=("hd",)),
        devices=(Disk("/i/root.qcow2", "vda"), Controller("usb", "none")),
    )
    assert domain.to_xml() == (
        '<domain type="qemu">\n'
        "  <name>mc-i-0123</name>\n"
        "  <uuid>6f1c3d6e-8f55-4a38-9d4e-0d7c2e8f9a10</uuid>\n"
        '  <memory unit="KiB">131072</memory>\n'
        '  <currentMemory unit="KiB">131072</currentMemory>\n'
        "  <vcpu>1</vcpu>\n"
        "  <os>\n"
        '    <type arch="x86_64" machine="q35">hvm</type>\n'
        '    <boot dev="hd" />\n'
        "  </os>\n"
        "  <features>\n"
        "    <acpi />\n"
        "    <apic />\n"
        "  </features>\n"
        '  <clock offset="utc" />\n'
        "  <on_poweroff>destroy</on_poweroff>\n"
        "  <on_reboot>restart</on_reboot>\n"
        "  <on_crash>destroy</on_crash>\n"
        "  <devices>\n"
        '    <disk type="file" device="disk">\n'
        '      <driver name="qemu" type="qcow2" />\n'
        '      <source file="/i/root.qcow2" />\n'
        '      <target dev="vda" bus="virtio" />\n'
        "    </disk>\n"
        '    <controller type="usb" model="none" />\n'
        "  </devices>\n"
        "</domain>\n"
    )


def test_domain_current_memory_and_cpu_render_when_set() -> None:
    domain = Domain(
        type="kvm",
        name="d",
        uuid="u",
        memory_kib=2097152,
        current_memory_kib=1048576,
        vcpu=Vcpu(4, current=2),
        os=Os(),
        cpu=Cpu("host-passthrough"),
        features=None,
    )
    root = ET.fromstring(domain.to_xml())
    assert root.findtext("memory") == "2097152"
    assert root.findtext("currentMemory") == "1048576"
    assert [child.tag for child in root] == [
        "name",
        "uuid",
        "memory",
        "currentMemory",
        "vcpu",
        "os",
        "cpu",
        "clock",
        "on_poweroff",
        "on_reboot",
        "on_crash",
        "devices",
    ]


# --- metadata -------------------------------------------------------------------------------------------------------


def test_metadata_round_trips_through_the_domain_xml() -> None:
    domain = dataclasses.replace(domain_for(_spec()), metadata=META)
    assert read_metadata(domain.to_xml()) == META


def test_metadata_is_read_back_from_libvirt_style_xml() -> None:
    """libvirt moves the namespace declaration onto <metadata> and uses single quotes; that still parses."""
    xml = (
        "<domain type='qemu'><name>x</name>"
        f"<metadata xmlns:minicloud='{NS}'>{META_XML.replace(' ' + NSDECL, '')}</metadata></domain>"
    )
    assert read_metadata(xml) == META


def test_read_metadata_returns_none_for_a_foreign_domain() -> None:
    foreign = (
        "<domain type='kvm'><name>someone-elses-vm</name>"
        "<metadata><app:instance xmlns:app='https://example.com/app/1'><app:id>x</app:id></app:instance></metadata>"
        "</domain>"
    )
    assert read_metadata(foreign) is None
    assert read_metadata("<domain type='kvm'><name>bare</name></domain>") is None


def test_read_metadata_rejects_our_element_when_incomplete() -> None:
    broken = f"<domain><metadata><minicloud:instance {NSDECL}><minicloud:id>i-1</minicloud:id></minicloud:instance></metadata></domain>"
    with pytest.raises(MetadataError, match="no <project>"):
        read_metadata(broken)


@pytest.mark.parametrize(("created", "error"), [("2026-01-01T00:00:00", "timezone"), ("yesterday", "ISO 8601")])
def test_metadata_requires_an_iso_time_with_a_timezone(created: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        dataclasses.replace(META, created=created)


def test_read_metadata_rejects_a_bad_created_time() -> None:
    xml = f"<domain><metadata>{META_XML.replace(CREATED, 'soon')}</metadata></domain>"
    with pytest.raises(MetadataError, match="ISO 8601"):
        read_metadata(xml)


# --- designs --------------------------------------------------------------------------------------------------------


def _spec(**changes: object) -> GuestSpec:
    spec = GuestSpec(
        uuid="6f1c3d6e-8f55-4a38-9d4e-0d7c2e8f9a10",
        domain_name="mc-i-0123",
        virt_type="qemu",
        vcpus=2,
        memory_mib=256,
        root_disk=Path("/i/root.qcow2"),
        seed_iso=None,
        console_log=Path("/i/console.log"),
        metadata=META,
    )
    return dataclasses.replace(spec, **changes)  # type: ignore[arg-type]


DEVICES_TAIL = (
    '<serial type="file"><source path="/i/console.log" append="on" /><target port="0" /></serial>'
    '<console type="file"><source path="/i/console.log" append="on" /><target type="serial" port="0" /></console>'
    '<controller type="usb" model="none" />'
    '<memballoon model="virtio"><stats period="10" /></memballoon>'
    '<rng model="virtio"><backend model="random">/dev/urandom</backend></rng>'
)
ROOT_DISK = (
    '<disk type="file" device="disk"><driver name="qemu" type="qcow2" discard="unmap" />'
    '<source file="/i/root.qcow2" /><target dev="vda" bus="virtio" /></disk>'
)


def _part(domain: Domain, tag: str) -> str:
    el = domain.to_element().find(tag)
    assert el is not None
    return render(el)


def test_direct_kernel_tcg_design_is_golden() -> None:
    spec = _spec(kernel=Path("/img/vmlinuz"), initrd=Path("/img/initrd.img"), cmdline="panic=-1")
    assert domain_for(spec).to_xml() == (
        f'<domain {NSDECL} type="qemu">\n'
        "  <name>mc-i-0123</name>\n"
        "  <uuid>6f1c3d6e-8f55-4a38-9d4e-0d7c2e8f9a10</uuid>\n"
        "  <metadata>\n"
        "    <minicloud:instance>\n"
        "      <minicloud:id>i-0123</minicloud:id>\n"
        "      <minicloud:project>p-demo</minicloud:project>\n"
        "      <minicloud:name>web-1</minicloud:name>\n"
        "      <minicloud:node>node-a</minicloud:node>\n"
        "      <minicloud:image>debian-12</minicloud:image>\n"
        "      <minicloud:type>m1.small</minicloud:type>\n"
        "      <minicloud:created>2026-11-22T10:30:00.000Z</minicloud:created>\n"
        "    </minicloud:instance>\n"
        "  </metadata>\n"
        '  <memory unit="KiB">262144</memory>\n'
        '  <currentMemory unit="KiB">262144</currentMemory>\n'
        "  <vcpu>2</vcpu>\n"
        "  <os>\n"
        '    <type arch="x86_64" machine="q35">hvm</type>\n'
        "    <kernel>/img/vmlinuz</kernel>\n"
        "    <initrd>/img/initrd.img</initrd>\n"
        "    <cmdline>console=ttyS0 panic=-1</cmdline>\n"
        "  </os>\n"
        "  <features>\n"
        "    <acpi />\n"
        "    <apic />\n"
        "  </features>\n"
        '  <cpu mode="maximum" />\n'
        '  <clock offset="utc">\n'
        '    <timer name="rtc" tickpolicy="catchup" />\n'
        '    <timer name="pit" tickpolicy="delay" />\n'
        '    <timer name="hpet" present="no" />\n'
        "  </clock>\n"
        "  <on_poweroff>destroy</on_poweroff>\n"
        "  <on_reboot>restart</on_reboot>\n"
        "  <on_crash>destroy</on_crash>\n"
        "  <devices>\n"
        '    <disk type="file" device="disk">\n'
        '      <driver name="qemu" type="qcow2" discard="unmap" />\n'
        '      <source file="/i/root.qcow2" />\n'
        '      <target dev="vda" bus="virtio" />\n'
        "    </disk>\n"
        '    <serial type="file">\n'
        '      <source path="/i/console.log" append="on" />\n'
        '      <target port="0" />\n'
        "    </serial>\n"
        '    <console type="file">\n'
        '      <source path="/i/console.log" append="on" />\n'
        '      <target type="serial" port="0" />\n'
        "    </console>\n"
        '    <controller type="usb" model="none" />\n'
        '    <memballoon model="virtio">\n'
        '      <stats period="10" />\n'
        "    </memballoon>\n"
        '    <rng model="virtio">\n'
        '      <backend model="random">/dev/urandom</backend>\n'
        "    </rng>\n"
        "  </devices>\n"
        "</domain>\n"
    )


def test_design_is_deterministic() -> None:
    spec = _spec(seed_iso=Path("/i/seed.iso"), nics=(Nic(mac_for("i-0123"), "mcbr0"),))
    assert domain_for(spec).to_xml() == domain_for(spec).to_xml()
    assert domain_for(spec) == domain_for(spec)


def test_bios_disk_design_boots_the_root_disk_without_seed_or_nics() -> None:
    domain = domain_for(_spec())
    assert _part(domain, "os") == '<os><type arch="x86_64" machine="q35">hvm</type><boot dev="hd" /></os>'
    assert _part(domain, "devices") == f"<devices>{ROOT_DISK}{DEVICES_TAIL}</devices>"


def test_bios_disk_design_with_seed_and_nics() -> None:
    spec = _spec(
        seed_iso=Path("/i/seed.iso"),
        nics=(Nic("52:aa:bb:cc:dd:01", "mcbr0"), Nic("52:aa:bb:cc:dd:02", "mcbr1")),
        root_format="raw",
    )
    assert _part(domain_for(spec), "devices") == (
        "<devices>"
        '<disk type="file" device="disk"><driver name="qemu" type="raw" discard="unmap" />'
        '<source file="/i/root.qcow2" /><target dev="vda" bus="virtio" /></disk>'
        '<disk type="file" device="cdrom"><driver name="qemu" type="raw" />'
        '<source file="/i/seed.iso" /><target dev="sda" bus="sata" /><readonly /></disk>'
        '<interface type="bridge"><mac address="52:aa:bb:cc:dd:01" /><source bridge="mcbr0" />'
        '<model type="virtio" /></interface>'
        '<interface type="bridge"><mac address="52:aa:bb:cc:dd:02" /><source bridge="mcbr1" />'
        '<model type="virtio" /></interface>'
        f"{DEVICES_TAIL}</devices>"
    )


def test_uefi_design_uses_ovmf_and_a_per_guest_nvram() -> None:
    domain = domain_for(_spec(firmware="uefi", nvram=Path("/i/nvram.fd")))
    assert _part(domain, "os") == (
        '<os><type arch="x86_64" machine="q35">hvm</type>'
        '<loader readonly="yes" type="pflash">/usr/share/OVMF/OVMF_CODE_4M.fd</loader>'
        '<nvram template="/usr/share/OVMF/OVMF_VARS_4M.fd">/i/nvram.fd</nvram>'
        '<boot dev="hd" /></os>'
    )


def test_uefi_without_nvram_is_refused() -> None:
    with pytest.raises(ValueError, match="nvram"):
        domain_for(_spec(firmware="uefi"))


def test_kvm_guests_get_the_host_cpu_and_tcg_guests_the_maximum_model() -> None:
    assert _part(domain_for(_spec(virt_type="kvm")), "cpu") == '<cpu mode="host-passthrough" />'
    assert domain_for(_spec(virt_type="kvm")).type == "kvm"
    assert _part(domain_for(_spec(virt_type="qemu")), "cpu") == '<cpu mode="maximum" />'


def test_initrd_or_cmdline_without_kernel_is_refused() -> None:
    with pytest.raises(ValueError, match="need a kernel"):
        domain_for(_spec(cmdline="quiet"))


@pytest.mark.parametrize("changes", [{"vcpus": 0}, {"memory_mib": 0}])
def test_empty_guests_are_refused(changes: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        domain_for(_spec(**changes))


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("", "console=ttyS0"),
        ("panic=-1 quiet", "console=ttyS0 panic=-1 quiet"),
        ("root=/dev/vda1 console=ttyS0,115200n8", "root=/dev/vda1 console=ttyS0,115200n8"),
        ("console=ttyS0", "console=ttyS0"),
        ("console=tty0", "console=ttyS0 console=tty0"),
        ("console=ttyS01", "console=ttyS0 console=ttyS01"),
    ],
)
def test_kernel_cmdline_gets_the_serial_console_once(given: str, expected: str) -> None:
    assert kernel_cmdline(given) == expected


def test_mac_for_is_stable_unicast_locally_administered_and_distinct() -> None:
    mac = mac_for("i-0123")
    assert mac == mac_for("i-0123", 0)
    octets = [int(x, 16) for x in mac.split(":")]
    assert len(octets) == 6
    assert octets[0] & 0x01 == 0  # unicast
    assert octets[0] & 0x02 == 0x02  # locally administered
    macs = {mac_for(f"i-{n}", i) for n in range(500) for i in range(4)}
    assert len(macs) == 2000
    with pytest.raises(ValueError):
        mac_for("i-0123", -1)
