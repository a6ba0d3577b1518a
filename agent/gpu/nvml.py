"""NVML, behind a protocol: what the NVIDIA driver reports of each GPU it drives.

:class:`NvmlSource` is the interface; :class:`PynvmlSource` is the real driver (``nvidia-ml-py``, import name
``pynvml``; the PyPI package called ``pynvml`` is deprecated). It takes the module as an argument so that tests can
give it a stand-in with the same functions; the agent gives it the real module. Every call runs on a worker thread
(the caller's business: :func:`agent.gpu.inventory.discover` is synchronous and the publisher runs it in the
executor), and every read is one ``nvmlInit`` … ``nvmlShutdown`` pair, so a driver reloaded between reads is seen.

A node without ``libnvidia-ml.so.1`` or without the loaded driver is normal (most nodes have no GPU): ``read``
raises :class:`NvmlUnavailable` whose message says which, and nothing is logged as an error.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Protocol


class NvmlUnavailable(Exception):
    """NVML cannot be used on this node; ``str(exc)`` says why (no library, no driver, no permission)."""


@dataclass(frozen=True)
class MigDevice:
    """One MIG instance of a GPU in MIG mode."""

    index: int
    uuid: str
    name: str
    memory_mib: int


@dataclass(frozen=True)
class NvmlDevice:
    """One GPU as NVML reports it. The live figures (temperature, utilisation, memory used, power) are None where
    the GPU does not support them."""

    index: int
    uuid: str
    name: str
    memory_mib: int
    #: Normalised like sysfs: ``0000:3b:00.0`` (NVML says ``00000000:3B:00.0``).
    pci_address: str
    #: ``enabled``, ``disabled`` or ``unsupported``.
    mig_mode: str = "unsupported"
    mig_devices: tuple[MigDevice, ...] = ()
    power_limit_w: float | None = None
    temperature_c: float | None = None
    utilization_pct: float | None = None
    memory_used_mib: int | None = None
    power_w: float | None = None


@dataclass(frozen=True)
class NvmlReading:
    driver_version: str
    #: ``12.4`` (from ``nvmlSystemGetCudaDriverVersion``'s 12040).
    cuda_version: str
    devices: tuple[NvmlDevice, ...]


class NvmlSource(Protocol):
    def read(self) -> NvmlReading:
        """Every GPU NVML sees now; raises :class:`NvmlUnavailable` when NVML cannot be used (blocking)."""
        ...


def normalise_bus_id(bus_id: str | bytes) -> str:
    """``00000000:3B:00.0`` → ``0000:3b:00.0`` (sysfs's spelling: a 4-digit domain, lower case)."""
    text = bus_id.decode() if isinstance(bus_id, bytes) else bus_id
    text = text.strip().lower()
    domain, _, rest = text.partition(":")
    if not rest:
        return text
    return f"{int(domain, 16):04x}:{rest}"


def cuda_version(value: int) -> str:
    """NVML's CUDA driver version integer (``12040``) as ``12.4``."""
    return f"{value // 1000}.{(value % 1000) // 10}"


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


class PynvmlSource:
    """The real NVML through ``pynvml`` (or a module with the same functions, for tests)."""

    def __init__(self, module: Any = None) -> None:
        self._module = module
        #: One read at a time (the GPU reconciler and the metrics collector share a source): init and shutdown pair.
        self._lock = threading.Lock()

    def _nvml(self) -> Any:
        if self._module is None:
            try:
                import pynvml
            except ImportError as exc:
                raise NvmlUnavailable(f"nvidia-ml-py is not installed ({exc}): pip install 'minicloud[agent]'") from exc
            self._module = pynvml
        return self._module

    def read(self) -> NvmlReading:
        with self._lock:
            return self._read()

    def _read(self) -> NvmlReading:
        nv = self._nvml()
        try:
            nv.nvmlInit()
        except nv.NVMLError as exc:
            code = getattr(exc, "value", None)
            if code == nv.NVML_ERROR_LIBRARY_NOT_FOUND:
                raise NvmlUnavailable("libnvidia-ml.so.1 is not installed (no NVIDIA driver on this node)") from None
            if code == nv.NVML_ERROR_DRIVER_NOT_LOADED:
                raise NvmlUnavailable("the NVIDIA kernel driver is not loaded (nvidia.ko)") from None
            raise NvmlUnavailable(f"NVML failed to initialise: {exc}") from None
        try:
            driver = _text(nv.nvmlSystemGetDriverVersion())
            cuda = self._optional(nv, nv.nvmlSystemGetCudaDriverVersion)
            devices = tuple(self._device(nv, i) for i in range(nv.nvmlDeviceGetCount()))
            return NvmlReading(driver_version=driver, cuda_version=cuda_version(cuda) if cuda else "", devices=devices)
        except nv.NVMLError as exc:
            raise NvmlUnavailable(f"NVML failed while reading the GPUs: {exc}") from None
        finally:
            with contextlib.suppress(nv.NVMLError):
                nv.nvmlShutdown()

    @staticmethod
    def _optional(nv: Any, fn: Any, *args: Any) -> Any:
        """``fn(*args)``, or None where the GPU does not support it."""
        try:
            return fn(*args)
        except nv.NVMLError as exc:
            if getattr(exc, "value", None) in (nv.NVML_ERROR_NOT_SUPPORTED, nv.NVML_ERROR_NOT_FOUND):
                return None
            raise

    def _device(self, nv: Any, index: int) -> NvmlDevice:
        h = nv.nvmlDeviceGetHandleByIndex(index)
        mem = nv.nvmlDeviceGetMemoryInfo(h)
        mig = self._optional(nv, nv.nvmlDeviceGetMigMode, h)
        mig_mode = "unsupported" if mig is None else ("enabled" if mig[0] else "disabled")
        migs: list[MigDevice] = []
        if mig_mode == "enabled":
            for i in range(self._optional(nv, nv.nvmlDeviceGetMaxMigDeviceCount, h) or 0):
                m = self._optional(nv, nv.nvmlDeviceGetMigDeviceHandleByIndex, h, i)
                if m is None:
                    continue
                migs.append(
                    MigDevice(
                        index=i,
                        uuid=_text(nv.nvmlDeviceGetUUID(m)),
                        name=_text(self._optional(nv, nv.nvmlDeviceGetName, m) or ""),
                        memory_mib=int(nv.nvmlDeviceGetMemoryInfo(m).total) >> 20,
                    )
                )
        limit = self._optional(nv, nv.nvmlDeviceGetPowerManagementLimit, h)
        power = self._optional(nv, nv.nvmlDeviceGetPowerUsage, h)
        temp = self._optional(nv, nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
        util = self._optional(nv, nv.nvmlDeviceGetUtilizationRates, h)
        return NvmlDevice(
            index=index,
            uuid=_text(nv.nvmlDeviceGetUUID(h)),
            name=_text(nv.nvmlDeviceGetName(h)),
            memory_mib=int(mem.total) >> 20,
            pci_address=normalise_bus_id(nv.nvmlDeviceGetPciInfo(h).busId),
            mig_mode=mig_mode,
            mig_devices=tuple(migs),
            power_limit_w=None if limit is None else limit / 1000,
            temperature_c=None if temp is None else float(temp),
            utilization_pct=None if util is None else float(util.gpu),
            memory_used_mib=int(mem.used) >> 20,
            power_w=None if power is None else power / 1000,
        )
