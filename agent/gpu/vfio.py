"""Binding a GPU's PCI functions to ``vfio-pci`` for a guest, and giving them back to their own drivers.

With ``gpu.manage_binding = true`` the node does it: before a GPU instance's domain is defined, every function of
the GPU (:attr:`GpuSpec.functions`) gets ``driver_override = vfio-pci``, is unbound from its driver and re-probed;
when the instance is deleted, the override is cleared, the function unbound from ``vfio-pci`` and re-probed, so the
kernel binds its own driver again (``nvidia``, ``snd_hda_intel``). Both are idempotent. With ``manage_binding = false``
(the default) the node only checks: every function must already be bound to ``vfio-pci`` by the operator
(docs/gpus.md), else :class:`BindingError` says which is not. The domain's ``<hostdev>`` is ``managed='no'`` either
way: libvirt never rebinds behind the node's back (it would give the GPU back at every stop).

These are sysfs writes (blocking, root): run them in an executor. The sysfs root is a parameter (tests use a tree in
a temporary directory; the kernel's effects of the writes are then not simulated, the writes themselves are checked).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("minicloud.gpu")
VFIO = "vfio-pci"


class BindingError(Exception):
    """A function cannot be (or is not) bound as required; the message says which and what to do."""


def _driver(dev: Path) -> str:
    link = dev / "driver"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else ""


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        raise BindingError(f"writing {value.strip()!r} to {path} failed: {exc.strerror or exc}") from exc


def check_bound(functions: list[str], sysfs: Path | str = "/sys") -> None:
    """Raise :class:`BindingError` unless every function is bound to ``vfio-pci`` (``manage_binding = false``)."""
    devices = Path(sysfs) / "bus" / "pci" / "devices"
    wrong = [f"{a} ({_driver(devices / a) or 'no driver'})" for a in functions if _driver(devices / a) != VFIO]
    if wrong:
        raise BindingError(
            f"the GPU's functions must be bound to vfio-pci, and {', '.join(wrong)} are not: bind them "
            "(docs/gpus.md, 'Preparing a host', step 4 'Binding') or set gpu.manage_binding = true"
        )


def bind(functions: list[str], sysfs: Path | str = "/sys") -> list[str]:
    """Bind every function to ``vfio-pci``; returns the ones that changed (idempotent: already bound is fine)."""
    root = Path(sysfs)
    devices = root / "bus" / "pci" / "devices"
    changed = []
    for address in functions:
        dev = devices / address
        if not dev.exists():
            raise BindingError(f"PCI function {address} is gone from {devices}")
        if _driver(dev) == VFIO:
            continue
        _write(dev / "driver_override", VFIO)
        if _driver(dev):
            _write(dev / "driver" / "unbind", address)
        _write(root / "bus" / "pci" / "drivers_probe", address)
        changed.append(address)
        log.info("bound a GPU function to vfio-pci", extra={"pci": address})
    return changed


def give_back(functions: list[str], sysfs: Path | str = "/sys") -> list[str]:
    """Clear the override and unbind from ``vfio-pci`` so the kernel re-probes each function's own driver; returns
    the ones that changed (idempotent)."""
    root = Path(sysfs)
    devices = root / "bus" / "pci" / "devices"
    changed = []
    for address in functions:
        dev = devices / address
        if not dev.exists():
            continue
        _write(dev / "driver_override", "\n")
        if _driver(dev) == VFIO:
            _write(dev / "driver" / "unbind", address)
            _write(root / "bus" / "pci" / "drivers_probe", address)
            changed.append(address)
            log.info("gave a GPU function back to its driver", extra={"pci": address})
    return changed
