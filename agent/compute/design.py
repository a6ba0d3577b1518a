"""What a guest gets: turns a ``GuestSpec`` (what the driver knows about an instance) into a ``Domain``.

This module is policy: every decision about devices, firmware and boot lives here, and ``agent.compute.xml`` only
renders. The functions are pure (no I/O, no clock, no randomness), so the same spec always gives the same XML.

The guest, in short:

- q35 machine, ACPI, APIC, UTC clock; ``kvm`` guests get the host CPU (``host-passthrough``), ``qemu`` (TCG) guests
  QEMU's ``max`` CPU model (``mode='maximum'``), which emulates x86-64-v2+ so distributions that require it boot;
- boot: direct kernel boot when ``kernel`` is set (``console=ttyS0`` is added to the command line if missing), else from
  the root disk, with SeaBIOS or UEFI (OVMF, a per-guest NVRAM copied from the OVMF variables template);
- root disk: ``vda`` on virtio (discard passed down, so a thin qcow2 gives space back): a file on the host, or any
  ``DiskSource`` a volume driver gives (an RBD image: a network disk through librbd);
- volumes: ``vdb``… on virtio after it, each from a ``DiskSource`` with the volume id as its serial number and optional
  I/O limits (``disk_xml`` renders one for hot-plug);
- NoCloud seed: a read-only CD-ROM ``sda`` on SATA (AHCI), found by the guest by its ISO label ``cidata``;
- NICs: virtio, each plugged into its host bridge;
- GPUs: one ``<hostdev>`` (VFIO, ``managed='no'``: the node binds them) per PCI function of each GPU it holds;
- serial port 0 written to ``console_log`` (appended across restarts), which is also the libvirt console;
- a virtio balloon (memory statistics every 10 s), a virtio RNG from ``/dev/urandom``; no USB, no graphics;
- power off and crash destroy the domain (the reconciler decides what happens next); reboot restarts it.
"""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent.compute.xml import (
    Clock,
    Console,
    Controller,
    Cpu,
    Device,
    Disk,
    Domain,
    Features,
    Hostdev,
    InstanceMetadata,
    Interface,
    IoTune,
    Loader,
    MemBalloon,
    Nvram,
    Os,
    RbdDisk,
    Rng,
    Serial,
    Timer,
    Vcpu,
)
from agent.storage.driver import DiskSource

# Debian 12's `ovmf` package: the 4 MiB flash layout without Secure Boot (no SMM needed, so it runs under TCG).
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS_TEMPLATE = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")

SERIAL_CONSOLE_ARG = "console=ttyS0"
BALLOON_STATS_PERIOD_S = 10


@dataclass(frozen=True)
class Nic:
    """One guest NIC: its MAC address and the host bridge it is plugged into (which must exist before start)."""

    mac: str
    bridge: str
    #: The host tap's name (None: libvirt picks ``vnetN``). VPC ports get ``nodenetworks.tap_name(port)``: the
    #: node's security-group rules match on it.
    tap: str | None = None


@dataclass(frozen=True)
class AttachedDisk:
    """A volume as a guest gets it: where its data is (``source``, from the pool's driver), the device it appears as
    (``target_dev``, ``vdb``… on ``bus``), the serial number the guest sees (the volume id: virtio shows its first 20
    characters in ``/dev/disk/by-id/virtio-…``) and optional I/O limits."""

    source: DiskSource
    target_dev: str
    serial: str = ""
    iotune: IoTune | None = None
    bus: Literal["virtio", "sata", "scsi"] = "virtio"


@dataclass(frozen=True, kw_only=True)
class GuestSpec:
    """Everything ``domain_for`` needs to design a guest; paths are on the host and must exist when it starts.

    ``kernel``/``initrd``/``cmdline`` select direct kernel boot. ``firmware='uefi'`` needs ``nvram``: the per-guest
    variable store, which libvirt creates from the OVMF template on first start and removes on undefine with
    ``VIR_DOMAIN_UNDEFINE_NVRAM``.

    ``root_disk`` is a file (a ``Path`` in ``root_format``) or a ``DiskSource`` from a volume driver (its own format);
    ``root_serial`` and ``root_iotune`` apply to either. ``volumes`` follow it, each on its own target device.
    """

    uuid: str
    domain_name: str
    virt_type: Literal["kvm", "qemu"]
    vcpus: int
    #: vCPUs the guest may be given while it runs (CPU hot-plug); None or <= ``vcpus``: no hot-plug.
    max_vcpus: int | None = None
    memory_mib: int
    root_disk: Path | DiskSource
    root_format: Literal["qcow2", "raw"] = "qcow2"
    root_serial: str = ""
    root_iotune: IoTune | None = None
    volumes: tuple[AttachedDisk, ...] = ()
    seed_iso: Path | None
    console_log: Path
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str = ""
    firmware: Literal["bios", "uefi"] = "bios"
    nvram: Path | None = None
    nics: tuple[Nic, ...] = ()
    #: Host PCI functions passed through (a GPU's functions, ``0000:3b:00.0``…), bound to ``vfio-pci`` beforehand.
    hostdevs: tuple[str, ...] = ()
    metadata: InstanceMetadata


def kernel_cmdline(cmdline: str) -> str:
    """``cmdline`` with ``console=ttyS0`` first unless it already names ttyS0, so boot messages reach the console log."""
    args = cmdline.split()
    if any(a == SERIAL_CONSOLE_ARG or a.startswith(SERIAL_CONSOLE_ARG + ",") for a in args):
        return " ".join(args)
    return " ".join([SERIAL_CONSOLE_ARG, *args])


def _os_for(spec: GuestSpec) -> Os:
    loader = nvram = None
    if spec.firmware == "uefi":
        if spec.nvram is None:
            raise ValueError(f"{spec.domain_name}: UEFI firmware needs an nvram path (the guest's variable store)")
        loader = Loader(str(OVMF_CODE), readonly=True, type="pflash")
        nvram = Nvram(str(spec.nvram), template=str(OVMF_VARS_TEMPLATE))
    if spec.kernel is not None:
        return Os(
            loader=loader,
            nvram=nvram,
            kernel=str(spec.kernel),
            initrd=None if spec.initrd is None else str(spec.initrd),
            cmdline=kernel_cmdline(spec.cmdline),
        )
    if spec.initrd is not None or spec.cmdline:
        raise ValueError(f"{spec.domain_name}: initrd and cmdline need a kernel (direct kernel boot)")
    return Os(loader=loader, nvram=nvram, boot=("hd",))


def disk_for(disk: AttachedDisk) -> Disk | RbdDisk:
    """The ``<disk>`` element of a volume (or a root disk from a driver): an RBD network disk or a file disk."""
    src, serial = disk.source, disk.serial or None
    if src.kind == "rbd":
        if not (src.pool and src.image and src.hosts and src.user and src.secret_uuid):
            raise ValueError(f"{disk.target_dev}: an RBD disk needs a pool, an image, MON hosts, a user and a secret")
        return RbdDisk(
            src.pool,
            src.image,
            src.hosts,
            disk.target_dev,
            username=src.user,
            secret_uuid=src.secret_uuid,
            target_bus=disk.bus,
            serial=serial,
            iotune=disk.iotune,
        )
    if src.kind == "file":
        if not src.path or src.format not in ("qcow2", "raw"):
            raise ValueError(f"{disk.target_dev}: a file disk needs a path and the format qcow2 or raw")
        return Disk(
            src.path,
            disk.target_dev,
            disk.bus,
            driver_type=src.format,  # type: ignore[arg-type]
            discard="unmap",
            serial=serial,
            iotune=disk.iotune,
        )
    raise ValueError(f"{disk.target_dev}: no disk of kind {src.kind!r}")


def disk_xml(disk: AttachedDisk) -> str:
    """One ``<disk>`` element as ``domain_for`` designs it, for hot-plug (``attach_device``/``detach_device``)."""
    return ET.tostring(disk_for(disk).to_element(), encoding="unicode")


def _root_disk(spec: GuestSpec) -> Disk | RbdDisk:
    if isinstance(spec.root_disk, DiskSource):
        return disk_for(AttachedDisk(spec.root_disk, "vda", spec.root_serial, spec.root_iotune))
    return Disk(
        str(spec.root_disk),
        "vda",
        "virtio",
        driver_type=spec.root_format,
        discard="unmap",
        serial=spec.root_serial or None,
        iotune=spec.root_iotune,
    )


def _devices_for(spec: GuestSpec) -> tuple[Device, ...]:
    targets = ["vda", *(v.target_dev for v in spec.volumes)]
    if spec.seed_iso is not None:
        targets.append("sda")
    if dupes := sorted({t for t in targets if targets.count(t) > 1}):
        raise ValueError(f"{spec.domain_name}: more than one disk on {', '.join(dupes)}")
    devices: list[Device] = [_root_disk(spec), *(disk_for(v) for v in spec.volumes)]
    if spec.seed_iso is not None:
        devices.append(Disk(str(spec.seed_iso), "sda", "sata", device="cdrom", driver_type="raw", readonly=True))
    devices += [Interface(nic.mac, nic.bridge, model="virtio", target_dev=nic.tap) for nic in spec.nics]
    devices += [Hostdev(address, managed=False) for address in spec.hostdevs]
    devices += [
        Serial(str(spec.console_log), port=0, append=True),
        Console(str(spec.console_log), port=0, append=True),
        Controller("usb", model="none"),
        MemBalloon("virtio", stats_period=BALLOON_STATS_PERIOD_S),
        Rng("/dev/urandom"),
    ]
    return tuple(devices)


def domain_for(spec: GuestSpec) -> Domain:
    """The libvirt domain for ``spec`` (see the module docstring for what it contains). Pure and deterministic.

    Raises ``ValueError`` for specs that cannot be honoured: fewer than one vCPU or 1 MiB of memory, UEFI without an
    nvram path, an initrd/cmdline without a kernel, two disks on one target device, or an incomplete disk source.
    """
    if spec.vcpus < 1:
        raise ValueError(f"{spec.domain_name}: vcpus must be at least 1, not {spec.vcpus}")
    if spec.memory_mib < 1:
        raise ValueError(f"{spec.domain_name}: memory_mib must be at least 1, not {spec.memory_mib}")
    return Domain(
        type=spec.virt_type,
        name=spec.domain_name,
        uuid=spec.uuid,
        memory_kib=spec.memory_mib * 1024,
        current_memory_kib=spec.memory_mib * 1024,
        vcpu=Vcpu(spec.max_vcpus, current=spec.vcpus)
        if spec.max_vcpus is not None and spec.max_vcpus > spec.vcpus
        else Vcpu(spec.vcpus),
        metadata=spec.metadata,
        os=_os_for(spec),
        features=Features(acpi=True, apic=True),
        cpu=Cpu("host-passthrough") if spec.virt_type == "kvm" else Cpu("maximum"),
        clock=Clock(
            "utc",
            timers=(Timer("rtc", tickpolicy="catchup"), Timer("pit", tickpolicy="delay"), Timer("hpet", present=False)),
        ),
        on_poweroff="destroy",
        on_reboot="restart",
        on_crash="destroy",
        devices=_devices_for(spec),
    )


def mac_for(instance_id: str, index: int = 0) -> str:
    """A stable MAC address for NIC ``index`` of an instance: ``52:`` and 5 bytes of SHA-256 of the id and index.

    0x52 marks it locally administered and unicast (like QEMU's ``52:54:00`` prefix, which leaves only 24 random bits
    and gives a 50 % chance of a collision at about 4,800 NICs; 40 bits push that past a million). The same arguments
    always give the same address, so a redefined domain keeps its MAC and its DHCP lease.
    """
    if index < 0:
        raise ValueError(f"NIC index must be >= 0, not {index}")
    digest = hashlib.sha256(f"{instance_id}/{index}".encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x52, *digest[:5]))
