"""GPUs on this node, the store's side (the drivers in :mod:`agent.gpu` never touch it).

**The GPU reconciler** keeps this node's ``gpu`` records equal to what discovery finds.

One key (:data:`KEY`). A pass runs :func:`~agent.gpu.inventory.discover` on a worker thread (NVML and sysfs calls
block), keeps the inventory for ``node show`` and the metrics (``last``), and publishes it
(:func:`minicloud.gpu.service.publish`: creates, changes and removals in one compare-and-swap transaction, holders
kept). It runs at start, on every resync (``compute.resync_interval``: a GPU bound to ``vfio-pci`` or hot-removed
is seen then), and when one of this node's GPU records changes behind its back (a deleted record comes back).

A node without NVIDIA hardware or without ``libnvidia-ml.so.1`` publishes nothing and logs the reason once at
``info``: it is the normal case, not an error.

**A GPU instance on its node** (:func:`prepare`, :func:`give_back`): the PCI functions its domain gets, bound to
``vfio-pci`` first, and given back when it is deleted. Called by the compute reconciler (:mod:`agent.reconcilers.compute`) before it defines the domain and
after it undefined it for good.

The GPUs are the ``gpu`` records of this node whose holder is the instance (placement wrote them in the instance's
create transaction); each gives every function it lists (the GPU, its audio/USB functions), or its own address.
With ``gpu.manage_binding`` the functions are bound (:func:`agent.gpu.vfio.bind`), else checked
(:func:`agent.gpu.vfio.check_bound`); either raises :class:`~agent.gpu.vfio.BindingError` saying what to do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from agent.gpu import vfio
from agent.gpu.inventory import Inventory, discover
from agent.gpu.nvml import NvmlSource
from agent.gpu.sysfs import Sysfs
from agent.reconcile import Result
from minicloud.config import Config
from minicloud.gpu import service
from minicloud.gpu.kinds import GPU
from minicloud.state import Change, Store

log = logging.getLogger("minicloud.gpu")
KEY = ":gpus"


class GpuReconciler:
    name = "gpu"
    kinds = frozenset({GPU.name})

    def __init__(
        self,
        store: Store | None,
        node: str,
        nvml: NvmlSource,
        sysfs: Sysfs,
        *,
        on_inventory: Callable[[Inventory], None] | None = None,
    ) -> None:
        #: None until the store is open (the agent sets it before the controller starts).
        self.store = store
        self.node = node
        self.nvml = nvml
        self.sysfs = sysfs
        self.on_inventory = on_inventory
        #: The last inventory found (None before the first pass).
        self.last: Inventory | None = None
        self._said = ""

    def keys_for(self, change: Change) -> Iterable[str]:
        if change.record.spec.get("node") == self.node:
            yield KEY

    async def all_keys(self) -> list[str]:
        return [KEY]

    async def start(self, enqueue: Callable[[str], None]) -> None:
        enqueue(KEY)

    async def close(self) -> None:
        return None

    def discover(self) -> Inventory:
        """One discovery (blocking)."""
        return discover(self.node, self.nvml, self.sysfs)

    async def reconcile(self, key: str) -> Result:
        inv = await asyncio.get_running_loop().run_in_executor(None, self.discover)
        self.last = inv
        if self.on_inventory is not None:
            self.on_inventory(inv)
        said = inv.reason or f"{len(inv.gpus)} GPU(s)"
        if said != self._said:
            log.info("GPUs: %s", said, extra={"gpus": len(inv.gpus)})
            self._said = said
        for problem in inv.mismatches():
            log.warning("GPU inventory mismatch: %s", problem)
        assert self.store is not None, "the GPU reconciler runs once the store is open"
        await service.publish(self.store, self.node, inv.specs())
        return Result()


# -- a GPU instance on this node ----------------------------------------------------------------------------------------
async def functions_of(store: Store, node: str, instance_id: str) -> list[str]:
    """The PCI functions of the instance's GPUs on ``node``, in address order (empty: it holds none)."""
    out: list[str] = []
    for g in await service.held_by(store, node, instance_id):
        for address in g.spec.functions or [g.spec.pci_address]:
            if address not in out:
                out.append(address)
    return out


async def prepare(store: Store, config: Config, node: str, instance_id: str, wanted: int) -> tuple[str, ...]:
    """The functions to pass through, bound to ``vfio-pci`` (or checked to be). Raises ``BindingError`` when the
    instance holds fewer GPUs than it wants on this node or a function is not (and may not be made) vfio-bound."""
    functions = await functions_of(store, node, instance_id)
    held = len(await service.held_by(store, node, instance_id))
    if held < wanted:
        raise vfio.BindingError(
            f"the instance holds {held} of its {wanted} GPU(s) on node {node} (a GPU record was deleted?); "
            "delete it and create it again"
        )
    if config.gpu.manage_binding:
        await asyncio.to_thread(vfio.bind, functions, config.gpu.sysfs_root)
    else:
        await asyncio.to_thread(vfio.check_bound, functions, config.gpu.sysfs_root)
    return tuple(functions)


async def give_back(store: Store, config: Config, node: str, instance_id: str) -> None:
    """Give the instance's GPU functions back to their drivers (``manage_binding`` only; idempotent)."""
    if not config.gpu.manage_binding:
        return
    functions = await functions_of(store, node, instance_id)
    if functions:
        await asyncio.to_thread(vfio.give_back, functions, config.gpu.sysfs_root)
