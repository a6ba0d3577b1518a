"""Which GPUs an instance may get on a node: pure functions the scheduler's GPU filter and the instance service use.

An instance type asks for ``gpus`` GPUs and optionally a model pattern (``--gpu-model "H100*"``: a shell-style
pattern, case-insensitive, matched against the model as published, ``H100 80GB HBM3``, and with NVIDIA's prefix,
``NVIDIA H100 80GB HBM3``). A GPU can be given when it is present, passthrough-capable (IOMMU judgement), matches,
and no instance holds it. The chosen GPUs are the free matching ones in PCI address order (deterministic).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from minicloud.gpu.kinds import GpuSpec

#: The most GPUs one instance may ask for (and the longest model pattern).
MAX_GPUS = 16
MAX_PATTERN = 64


def model_matches(model: str, pattern: str) -> bool:
    """Whether ``model`` matches the shell-style ``pattern`` ("" matches everything), case-insensitively."""
    if not pattern:
        return True
    p = pattern.lower()
    return fnmatch.fnmatchcase(model.lower(), p) or fnmatch.fnmatchcase(f"nvidia {model}".lower(), p)


def usable(spec: GpuSpec, pattern: str) -> bool:
    return spec.present and spec.capable and not spec.instance and model_matches(spec.model, pattern)


def choose(gpus: Sequence[GpuSpec], count: int, pattern: str) -> list[GpuSpec]:
    """The first ``count`` usable GPUs in PCI address order, or fewer when there are not enough."""
    return sorted((g for g in gpus if usable(g, pattern)), key=lambda g: g.pci_address)[:count]


def shortage(gpus: Sequence[GpuSpec], count: int, pattern: str) -> str | None:
    """None when ``count`` GPUs matching ``pattern`` are free here; otherwise what is missing, in one line."""
    if count <= 0:
        return None
    free = choose(gpus, count, pattern)
    if len(free) >= count:
        return None
    what = f"{count} free passthrough-capable GPU{'s' if count > 1 else ''}" + (
        f" matching '{pattern}'" if pattern else ""
    )
    if not gpus:
        return f"{what} wanted, the node has no GPU"
    matching = [g for g in gpus if model_matches(g.model, pattern)]
    if not matching:
        models = ", ".join(sorted({g.model for g in gpus}))
        return f"{what} wanted, none of its GPUs matches ({models})"
    notes = []
    for g in matching:
        if g.instance:
            notes.append(f"{g.pci_address} held by instance {g.instance_name or g.instance}")
        elif not g.present:
            notes.append(f"{g.pci_address} gone from the node")
        elif not g.capable:
            notes.append(f"{g.pci_address} not capable: {g.reason[:120]}")
    return f"{what} wanted, {len(free)} free" + (f" ({'; '.join(notes)})" if notes else "")
