"""GPU records: the node's publication of its inventory, and the holding and release of GPUs by instances.

Publication (:func:`publish`) is the node agent's own write (no audit entry, like the ``hypervisor`` record): one
transaction that creates the records of new GPUs, rewrites changed facts (keeping the holder fields), marks a held
GPU that vanished ``present = False`` and deletes an unheld one, each with a compare-and-swap; a lost race reads
again. A GPU that moved to ``vfio-pci`` is seen by sysfs only: its NVML facts (model name, memory, UUID) are kept
from the last time NVML saw it at that address with the same PCI id.

Holding (:func:`claim_ops`) is part of the instance's create transaction: one compare-and-swap Update per GPU with
the instance's id and name, so two creates racing for the last GPU (on any API node) cannot both win; the loser
reads again and is placed elsewhere or refused (409 naming what is missing). Release (:func:`release_ops`) goes
into the transaction that removes the instance's record, i.e. after its node destroyed the guest and gave the GPU
back to its driver.
"""

from __future__ import annotations

from typing import Any

import msgspec

from minicloud import ids
from minicloud.core.kinds import Obj
from minicloud.gpu.kinds import GPU, GpuSpec, gpu_id, gpu_name
from minicloud.state import Create, Delete, Op, Store, Txn, TxnFailed, Update, list_all

Gpu = Obj[GpuSpec, Any]
_ATTEMPTS = 5


async def node_gpus(store: Store, node: str) -> list[Gpu]:
    """The GPU records of ``node`` (indexed on ``node``)."""
    return [GPU.load(r) for r in await list_all(store, GPU.name, where={"node": node})]


async def all_gpus(store: Store) -> dict[str, list[Gpu]]:
    """Every GPU record by node (one per GPU of the cluster: a small kind)."""
    out: dict[str, list[Gpu]] = {}
    for record in await list_all(store, GPU.name):
        obj = GPU.load(record)
        out.setdefault(obj.spec.node, []).append(obj)
    return out


def _merged(old: GpuSpec, new: GpuSpec) -> GpuSpec:
    """``new`` facts with ``old``'s holder, and ``old``'s NVML facts (model, memory, UUID, versions) when NVML does
    not see the GPU now (bound to ``vfio-pci``) but saw it before at this address with the same PCI id."""
    if not new.uuid and old.uuid and old.pci_id == new.pci_id:
        new = msgspec.structs.replace(
            new, model=old.model, memory_mib=old.memory_mib, uuid=old.uuid, driver_version=old.driver_version,
            cuda_version=old.cuda_version, power_limit_w=old.power_limit_w,
        )  # fmt: skip
    return msgspec.structs.replace(new, instance=old.instance, instance_name=old.instance_name)


async def publish(store: Store, node: str, specs: list[GpuSpec]) -> bool:
    """Make ``node``'s GPU records equal to ``specs`` (see the module docstring); True when something changed.
    Idempotent; raises the last ``TxnFailed`` when every attempt lost a race (the caller retries later)."""
    last: TxnFailed | None = None
    for _ in range(_ATTEMPTS):
        current = {g.id: g for g in await node_gpus(store, node)}
        stamp = ids.now()
        ops: list[Op] = []
        wanted: set[str] = set()
        for spec in specs:
            gid = gpu_id(node, spec.pci_address)
            wanted.add(gid)
            old = current.get(gid)
            if old is None:
                name = gpu_name(node, spec.pci_address)
                obj = GPU.new(project="", name=name, id=gid, spec=spec, labels={"node": node}, stamp=stamp)
                ops.append(Create(GPU.dump(obj)))
                continue
            merged = _merged(old.spec, spec)
            if merged != old.spec:
                ops.append(Update(GPU.dump(old.replace(spec=merged, updated_at=stamp)), expect_revision=old.revision))
        for gid, old in current.items():
            if gid in wanted:
                continue
            if old.spec.instance:
                if old.spec.present:
                    gone = msgspec.structs.replace(old.spec, present=False)
                    ops.append(Update(GPU.dump(old.replace(spec=gone, updated_at=stamp)), expect_revision=old.revision))
            else:
                ops.append(Delete(kind=GPU.name, id=gid, expect_revision=old.revision))
        if not ops:
            return False
        try:
            await store.commit(Txn(ops))
            return True
        except TxnFailed as exc:
            last = exc
    assert last is not None
    raise last


def claim_ops(chosen: list[Gpu], instance_id: str, instance_name: str, stamp: str) -> list[Op]:
    """The compare-and-swap Updates that make ``chosen`` (as read) held by the instance."""
    ops: list[Op] = []
    for g in chosen:
        spec = msgspec.structs.replace(g.spec, instance=instance_id, instance_name=instance_name)
        ops.append(Update(GPU.dump(g.replace(spec=spec, updated_at=stamp)), expect_revision=g.revision))
    return ops


async def held_by(store: Store, node: str, instance_id: str) -> list[Gpu]:
    """The GPUs of ``node`` the instance holds, in PCI address order."""
    if not node:
        return []
    held = [g for g in await node_gpus(store, node) if g.spec.instance == instance_id]
    return sorted(held, key=lambda g: g.spec.pci_address)


async def release_ops(store: Store, node: str, instance_id: str) -> list[Op]:
    """The ops that free the instance's GPUs (a GPU gone from its node meanwhile is deleted), compare-and-swap."""
    ops: list[Op] = []
    stamp = ids.now()
    for g in await held_by(store, node, instance_id):
        if not g.spec.present:
            ops.append(Delete(kind=GPU.name, id=g.id, expect_revision=g.revision))
            continue
        spec = msgspec.structs.replace(g.spec, instance="", instance_name="")
        ops.append(Update(GPU.dump(g.replace(spec=spec, updated_at=stamp)), expect_revision=g.revision))
    return ops
