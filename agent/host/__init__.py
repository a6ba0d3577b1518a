"""Host facts from psutil and /proc: CPUs, memory, disks, and whether KVM can be used.

``HostFacts.node()`` is cheap enough to call per request: the static facts are read once, and the changing figures
(free memory, disk space, load) are cached for one second.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from dataclasses import dataclass
from typing import Protocol

import psutil

from minicloud import __version__
from minicloud.model import Disk, Node, NodeGpus, Virtualization

_REAL_FS = {
    "ext2",
    "ext3",
    "ext4",
    "xfs",
    "btrfs",
    "zfs",
    "f2fs",
    "vfat",
    "ntfs",
    "reiserfs",
    "jfs",
    "bcachefs",
}


@dataclass(frozen=True)
class VirtSupport:
    kvm_device: bool
    hardware_virt: bool

    @property
    def virt_type(self) -> str:
        return "kvm" if self.kvm_device and self.hardware_virt else "qemu"

    @property
    def reason(self) -> str:
        if self.virt_type == "kvm":
            return "/dev/kvm opens and the CPU has hardware virtualization (vmx/svm)"
        if not self.kvm_device:
            return "/dev/kvm is missing or cannot be opened; guests run under TCG emulation (slower)"
        return (
            "/dev/kvm exists but the CPU flags show no vmx/svm (software KVM); guests run under TCG emulation, "
            "since stock guest kernels do not boot on it"
        )


def detect_virt(dev: str = "/dev/kvm", cpuinfo: str = "/proc/cpuinfo") -> VirtSupport:
    """KVM is usable only when ``dev`` opens read-write *and* the CPU flags show vmx or svm."""
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
        kvm = True
    except OSError:
        kvm = False
    hw = False
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    hw = bool(flags & {"vmx", "svm"})
                    break
    except OSError:
        pass
    return VirtSupport(kvm_device=kvm, hardware_virt=hw)


def choose_virt(setting: str, support: VirtSupport) -> tuple[str, str]:
    """The virt type guests get and why, from ``compute.virt_type`` (``auto``, ``kvm`` or ``qemu``)."""
    if setting == "auto":
        return support.virt_type, support.reason
    if setting == "kvm" and support.virt_type != "kvm":
        return "kvm", "compute.virt_type = kvm in the configuration (overriding detection: " + support.reason + ")"
    return setting, f"compute.virt_type = {setting} in the configuration"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _os_name() -> str:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME", "Linux")
    except OSError:
        return platform.system()


class HostFactsSource(Protocol):
    def node(self) -> Node: ...


class HostFacts:
    """Reads the real host with psutil."""

    def __init__(self, node_name: str, cache_seconds: float = 1.0, virt_setting: str = "auto") -> None:
        self.node_name = node_name
        self.cache_seconds = cache_seconds
        self._static = {
            "hostname": platform.node(),
            "kernel": platform.release(),
            "os": _os_name(),
            "arch": platform.machine(),
            "cpu_count": psutil.cpu_count() or 1,
            "cpu_model": _cpu_model(),
            "boot_time": _dt.datetime.fromtimestamp(psutil.boot_time(), _dt.UTC).isoformat().replace("+00:00", "Z"),
        }
        self.virt = detect_virt()
        self.virt_type, self.virt_reason = choose_virt(virt_setting, self.virt)
        self._cached: Node | None = None
        self._cached_at = 0.0
        #: The GPU summary the node's GPU reconciler sets after each discovery (None: none ran).
        self.gpus: NodeGpus | None = None

    def _disks(self) -> list[Disk]:
        disks = []
        seen = set()
        for part in psutil.disk_partitions(all=False):
            if part.fstype not in _REAL_FS or part.device in seen:
                continue
            seen.add(part.device)
            try:
                usage = psutil.disk_usage(part.mountpoint)
            except OSError:
                continue
            disks.append(
                Disk(
                    mountpoint=part.mountpoint,
                    device=part.device,
                    fstype=part.fstype,
                    total_bytes=usage.total,
                    free_bytes=usage.free,
                )
            )
        return disks

    def node(self) -> Node:
        now = time.monotonic()
        if self._cached is not None and now - self._cached_at < self.cache_seconds:
            return self._cached
        mem = psutil.virtual_memory()
        self._cached = Node(
            name=self.node_name,
            memory_total_bytes=mem.total,
            memory_available_bytes=mem.available,
            load_average=[round(x, 2) for x in os.getloadavg()],
            disks=self._disks(),
            virtualization=Virtualization(
                kvm_device=self.virt.kvm_device,
                hardware_virt=self.virt.hardware_virt,
                virt_type=self.virt_type,  # type: ignore[arg-type]
                reason=self.virt_reason,
            ),
            version=__version__,
            gpus=self.gpus,
            **self._static,
        )
        self._cached_at = now
        return self._cached
