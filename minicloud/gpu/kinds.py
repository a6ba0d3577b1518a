"""The ``gpu`` kind: one record per GPU of every node, published by that node's agent (cluster-scoped, read by
cluster administrators: ``admin:gpus:list|get``; ``minicloud gpu list|show``).

Who writes what: the node's agent owns the facts (everything but ``instance``/``instance_name``) and rewrites them
when its discovery changes (:func:`minicloud.gpu.service.publish`); instance placement owns the holder fields and
sets them in the instance's own transaction, with a compare-and-swap on the GPU record, so a GPU is held by at most
one instance; the removal of the instance's record clears them in the same transaction. Both writers preserve the
other's fields and retry on a lost compare-and-swap.

Retention: one record per GPU found; a record whose GPU is gone is deleted by its node unless it is held (then
``present`` turns False until the instance goes).
"""

from __future__ import annotations

import hashlib

import msgspec

from minicloud.core.kinds import Column, Kind, declare
from minicloud.gpu.spec import GpuMigSpec, GpuSpec
from minicloud.model.gpu import Gpu

__all__ = ["GPU", "GpuMigSpec", "GpuSpec", "gpu_id", "gpu_name"]


def _render(obj) -> Gpu:  # type: ignore[no-untyped-def]
    return msgspec.convert({**obj.common_fields(), **msgspec.to_builtins(obj.spec)}, Gpu)


GPU = declare(
    Kind(
        name="gpu",
        plural="gpus",
        prefix="gpu",
        spec=GpuSpec,
        scope="cluster",
        action="admin:gpus",
        view=Gpu,
        render=_render,
        noun="gpu",
        title="GPU",
        columns=(
            Column("name", "name"),
            Column("model", "model"),
            Column("memory_mib", "memory_mib"),
            Column("driver", "driver"),
            Column("capable", "capable"),
            Column("instance", "instance_name"),
            Column("id", "id"),
        ),
        generic=frozenset({"list", "show"}),
    )
)


def gpu_name(node: str, pci_address: str) -> str:
    """``n1:0000:3b:00.0``: a GPU's record name (unique: one PCI address per node)."""
    return f"{node}:{pci_address}"


def gpu_id(node: str, pci_address: str) -> str:
    """The record id: derived from the name, so two publications of one GPU cannot make two records."""
    return f"{GPU.prefix}-{hashlib.sha256(gpu_name(node, pci_address).encode()).hexdigest()[:16]}"
