"""Fakes for the GPU units: a sysfs tree in a temporary directory and a stand-in for the ``pynvml`` module (the
real :class:`agent.gpu.nvml.PynvmlSource` runs against it, so its calls are exercised without a GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any


class FakeSysfs:
    """Builds ``<root>/bus/pci/devices/<addr>/{vendor,device,class,driver,iommu_group}`` and
    ``<root>/kernel/iommu_groups/<n>/devices/<addr>`` like the kernel does (symlinks included)."""

    def __init__(self, root: Path, *, iommu: bool = True) -> None:
        self.root = root
        self.iommu = iommu
        self.devices = root / "bus" / "pci" / "devices"
        self.pci_devices = root / "devices" / "pci0000:00"
        self.drivers = root / "bus" / "pci" / "drivers"
        self.groups = root / "kernel" / "iommu_groups"
        for d in (self.devices, self.pci_devices, self.drivers, self.groups):
            d.mkdir(parents=True, exist_ok=True)

    def add(
        self, address: str, *, vendor: str = "0x10de", device: str = "0x2330", cls: str = "0x030200",
        driver: str = "nvidia", group: str | None = None,
    ) -> None:  # fmt: skip
        real = self.pci_devices / address
        real.mkdir(parents=True)
        (real / "vendor").write_text(vendor + "\n")
        (real / "device").write_text(device + "\n")
        (real / "class").write_text(cls + "\n")
        (real / "driver_override").write_text("(null)\n")
        os.symlink(real, self.devices / address)
        if driver:
            drv = self.drivers / driver
            drv.mkdir(exist_ok=True)
            for name in ("bind", "unbind"):
                (drv / name).touch()
            os.symlink(drv, real / "driver")
        if self.iommu and group is not None:
            gdir = self.groups / group / "devices"
            gdir.mkdir(parents=True, exist_ok=True)
            os.symlink(real, gdir / address)
            os.symlink(self.groups / group, real / "iommu_group")


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


@dataclass
class FakeGpu:
    uuid: str
    name: str
    bus_id: str
    memory_mib: int = 81559
    used_mib: int = 1024
    mig: tuple[int, int] | None = (0, 0)
    migs: list[tuple[str, str, int]] = field(default_factory=list)
    power_limit_mw: int | None = 700000
    power_mw: int | None = 85000
    temperature: int | None = 41
    utilization: int | None = 12


class FakePynvml:
    """The functions of ``pynvml`` that :class:`PynvmlSource` calls, over a list of :class:`FakeGpu`."""

    NVML_ERROR_NOT_SUPPORTED = 3
    NVML_ERROR_NOT_FOUND = 6
    NVML_ERROR_DRIVER_NOT_LOADED = 9
    NVML_ERROR_LIBRARY_NOT_FOUND = 12
    NVML_TEMPERATURE_GPU = 0
    NVMLError = NVMLError

    def __init__(self, gpus: list[FakeGpu], *, init_error: int | None = None, driver: str = "550.54.15") -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.driver = driver
        self.inits = 0
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> Any:
        return ("gpu", i)

    def _dev(self, h: Any) -> Any:
        if h[0] == "gpu":
            return self.gpus[h[1]]
        g = self.gpus[h[1]]
        uuid, name, mem = g.migs[h[2]]
        return SimpleNamespace(uuid=uuid, name=name, memory_mib=mem, used_mib=0)

    def nvmlDeviceGetUUID(self, h: Any) -> str:
        return self._dev(h).uuid

    def nvmlDeviceGetName(self, h: Any) -> bytes:
        return self._dev(h).name.encode()

    def nvmlDeviceGetMemoryInfo(self, h: Any) -> Any:
        d = self._dev(h)
        return SimpleNamespace(total=d.memory_mib << 20, used=d.used_mib << 20)

    def nvmlDeviceGetPciInfo(self, h: Any) -> Any:
        return SimpleNamespace(busId=self._dev(h).bus_id.encode())

    def _opt(self, value: Any) -> Any:
        if value is None:
            raise NVMLError(self.NVML_ERROR_NOT_SUPPORTED)
        return value

    def nvmlDeviceGetMigMode(self, h: Any) -> tuple[int, int]:
        return self._opt(self._dev(h).mig)

    def nvmlDeviceGetMaxMigDeviceCount(self, h: Any) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: Any, i: int) -> Any:
        if i >= len(self._dev(h).migs):
            raise NVMLError(self.NVML_ERROR_NOT_FOUND)
        return ("mig", h[1], i)

    def nvmlDeviceGetPowerManagementLimit(self, h: Any) -> int:
        return self._opt(self._dev(h).power_limit_mw)

    def nvmlDeviceGetPowerUsage(self, h: Any) -> int:
        return self._opt(self._dev(h).power_mw)

    def nvmlDeviceGetTemperature(self, h: Any, sensor: int) -> int:
        return self._opt(self._dev(h).temperature)

    def nvmlDeviceGetUtilizationRates(self, h: Any) -> Any:
        return SimpleNamespace(gpu=self._opt(self._dev(h).utilization), memory=0)
