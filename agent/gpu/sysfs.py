"""The PCI tree in sysfs: NVIDIA GPUs whatever driver holds them, their functions and their IOMMU groups.

NVML sees only GPUs the ``nvidia`` driver drives; a GPU handed to ``vfio-pci`` for passthrough disappears from it.
sysfs sees every PCI function (``/sys/bus/pci/devices/<address>/{vendor,device,class,driver,iommu_group}``), so the
inventory starts from here. The root is a parameter: tests build a fake tree in a temporary directory.

IOMMU judgement (:meth:`Sysfs.judge`): a GPU can be passed through only when the IOMMU is on (``/sys/kernel/
iommu_groups`` has groups) and every device in its group is either a function of the GPU's own slot (its audio,
USB-C or serial controller: they go to the guest with it) or a bridge (class 0x06xx: never handed over). Anything
else in the group would be taken from the host too, so the GPU is not capable and the reason names the intruder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

NVIDIA = "0x10de"
#: Display controllers: VGA (0x0300), 3D (0x0302), other (0x0380).
DISPLAY_CLASS = "0x03"
BRIDGE_CLASS = "0x06"
PCI_IDS = (Path("/usr/share/misc/pci.ids"), Path("/usr/share/hwdata/pci.ids"))


@dataclass(frozen=True)
class PciFunction:
    address: str
    vendor: str
    device: str
    #: ``0x030200``.
    class_code: str
    #: The kernel driver bound to it ("" when none).
    driver: str
    #: Its IOMMU group ("" when the IOMMU is off).
    iommu_group: str

    @property
    def slot(self) -> str:
        """``0000:3b:00`` of ``0000:3b:00.1``: the functions of one device share it."""
        return self.address.rsplit(".", 1)[0]

    @property
    def is_bridge(self) -> bool:
        return self.class_code.startswith(BRIDGE_CLASS)


@dataclass(frozen=True)
class Judgement:
    capable: bool
    reason: str
    #: The functions that go to a guest with the GPU (the GPU first), in address order after it.
    functions: tuple[str, ...]


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


class Sysfs:
    """Reads ``<root>/bus/pci/devices`` and ``<root>/kernel/iommu_groups`` (root: ``/sys``)."""

    def __init__(self, root: Path | str = "/sys", pci_ids: tuple[Path, ...] = PCI_IDS) -> None:
        self.root = Path(root)
        self.devices_dir = self.root / "bus" / "pci" / "devices"
        self.groups_dir = self.root / "kernel" / "iommu_groups"
        self.pci_ids = pci_ids
        self._names: dict[str, str] | None = None

    def function(self, address: str) -> PciFunction | None:
        d = self.devices_dir / address
        if not d.exists():
            return None
        driver = os.path.basename(os.readlink(d / "driver")) if (d / "driver").is_symlink() else ""
        group = os.path.basename(os.readlink(d / "iommu_group")) if (d / "iommu_group").is_symlink() else ""
        return PciFunction(
            address=address,
            vendor=_read(d / "vendor").lower(),
            device=_read(d / "device").lower(),
            class_code=_read(d / "class").lower(),
            driver=driver,
            iommu_group=group,
        )

    def functions(self) -> list[PciFunction]:
        try:
            names = sorted(os.listdir(self.devices_dir))
        except OSError:
            return []
        return [f for f in (self.function(n) for n in names) if f is not None]

    def gpus(self) -> list[PciFunction]:
        """Every NVIDIA display controller, in address order."""
        return [f for f in self.functions() if f.vendor == NVIDIA and f.class_code.startswith(DISPLAY_CLASS)]

    def iommu_enabled(self) -> bool:
        try:
            return any(True for _ in os.scandir(self.groups_dir))
        except OSError:
            return False

    def group_members(self, group: str) -> list[str]:
        try:
            return sorted(os.listdir(self.groups_dir / group / "devices"))
        except OSError:
            return []

    def judge(self, gpu: PciFunction) -> Judgement:
        """Whether ``gpu`` can be passed through, why not, and the functions that go with it."""
        slot_mates = sorted(f.address for f in self.functions() if f.slot == gpu.slot and f.address != gpu.address)
        own = (gpu.address, *slot_mates)
        if not self.iommu_enabled():
            return Judgement(
                False,
                "the IOMMU is off (/sys/kernel/iommu_groups is empty): add intel_iommu=on iommu=pt (Intel) or "
                "amd_iommu=on iommu=pt (AMD) to the kernel command line and reboot; see docs/gpus.md",
                own,
            )
        if not gpu.iommu_group:
            return Judgement(False, f"{gpu.address} is in no IOMMU group (is it behind an IOMMU?)", own)
        intruders: list[str] = []
        functions = [gpu.address]
        for address in self.group_members(gpu.iommu_group):
            if address == gpu.address:
                continue
            f = self.function(address)
            if f is None:
                continue
            if f.slot == gpu.slot and not f.is_bridge:
                functions.append(address)
            elif not f.is_bridge:
                intruders.append(f"{address} (class {f.class_code}, driver {f.driver or 'none'})")
        if intruders:
            return Judgement(
                False,
                f"IOMMU group {gpu.iommu_group} also holds {', '.join(intruders)}, which is neither a function of "
                "this GPU nor a bridge: passing the GPU through would take it from the host too; move the GPU to a "
                "slot with its own group (or enable ACS in the firmware)",
                tuple(functions),
            )
        return Judgement(True, "", tuple(functions))

    # -- names of GPUs NVML does not see ----------------------------------------------------------------------------
    def model_name(self, device: str) -> str:
        """The model of NVIDIA device ``0x2330`` from pci.ids (``GH100 [H100 SXM5 80GB]``), or a placeholder."""
        if self._names is None:
            self._names = self._load_names()
        dev = device.removeprefix("0x").lower()
        return self._names.get(dev, f"NVIDIA device 10de:{dev}")

    def _load_names(self) -> dict[str, str]:
        for path in self.pci_ids:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            names: dict[str, str] = {}
            inside = False
            for line in text.splitlines():
                if not line or line.startswith("#"):
                    continue
                if not line.startswith("\t"):
                    if inside:
                        break
                    inside = line.startswith("10de ")
                elif inside and not line.startswith("\t\t"):
                    dev, _, name = line.strip().partition(" ")
                    names[dev.lower()] = name.strip()
            return names
        return {}
