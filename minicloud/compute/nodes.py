"""The nodes as the scheduler sees them: capacity, usage, zone and state (``node list``), and ``node cordon`` /
``node uncordon``.

A node is a compute node once its agent published its ``hypervisor`` record. Its zone is the ``zone`` label of its
cluster ``node`` record (``cluster enable|add --zone``), its liveness that record's status (written by the services
leader), and ``node cordon`` sets ``cordoned`` (and the reason) in that record's spec: the scheduler's node-state
filter then places nothing new there. A node running alone (no cluster) has no ``node`` record: no zone, and cordon
is refused (409) because there is no other node to place on.

A cordon commits together with a raise of the node's ``placement`` record (the compare-and-swap token every create
placed there commits with), so a create that decided on the node before the cordon and commits after it fails its
transaction and decides again: once ``cordon`` answered, no new instance lands on the node.

:func:`cordon` is the function ``node drain`` (the migration service) calls before it moves instances away.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

import msgspec

from minicloud import errors
from minicloud.cluster.kinds import CLUSTER_SETTING, NODE
from minicloud.compute.kinds import HYPERVISOR, INSTANCE, PLACEMENT, PlacementSpec
from minicloud.compute.scheduler import ZERO, Demand, NodeCapacity, NodeView
from minicloud.core.context import Context
from minicloud.core.write import Written, commit
from minicloud.model.compute import ComputeNode
from minicloud.state import Change, Create, Op, Store, Update, list_all

_ATTEMPTS = 5


def placement_id(node: str) -> str:
    return f"{PLACEMENT.prefix}-{node}"


def _facts(spec: dict[str, Any]) -> tuple[str, int, int, int, str]:
    """(node, vCPUs, memory, node disk, server group) of a stored instance spec without decoding the whole instance:
    :func:`~minicloud.compute.scheduler.demand_of` on the raw fields."""
    on_node = spec.get("pool_driver", "") in ("", "local") and not spec.get("root_volume")
    return (
        str(spec.get("node", "")),
        int(spec["vcpus"]),
        int(spec["memory_mib"]),
        int(spec["disk_gib"]) if on_node else 0,
        str(spec.get("server_group", "")),
    )


Facts = tuple[str, int, int, int, str]


class _Index:
    """The facts of every instance, with per-node sums and per-group members kept up to date as they change."""

    def __init__(self) -> None:
        self.facts: dict[str, Facts] = {}
        #: node → [vCPUs, memory MiB, node disk GiB, instances]
        self.sums: dict[str, list[int]] = {}
        #: server group id → {instance id: node}
        self.groups: dict[str, dict[str, str]] = {}
        #: The nodes' ``hypervisor`` and cluster ``node`` records, by record id (loaded).
        self.hypervisors: dict[str, Any] = {}
        self.members: dict[str, Any] = {}
        #: The cluster-wide settings that were set (``cluster set``): name → value.
        self.settings: dict[str, str] = {}

    def set(self, instance_id: str, new: Facts | None) -> None:
        old = self.facts.pop(instance_id, None)
        if old is not None:
            acc = self.sums[old[0]]
            acc[0] -= old[1]
            acc[1] -= old[2]
            acc[2] -= old[3]
            acc[3] -= 1
            if acc[3] == 0:
                del self.sums[old[0]]
            if old[4]:
                members = self.groups[old[4]]
                members.pop(instance_id, None)
                if not members:
                    del self.groups[old[4]]
        if new is None:
            return
        self.facts[instance_id] = new
        acc = self.sums.setdefault(new[0], [0, 0, 0, 0])
        acc[0] += new[1]
        acc[1] += new[2]
        acc[2] += new[3]
        acc[3] += 1
        if new[4]:
            self.groups.setdefault(new[4], {})[instance_id] = new[0]

    def apply(self, change: Change) -> None:
        deleted = change.type == "deleted"
        if change.kind == INSTANCE.name:
            self.set(change.id, None if deleted else _facts(change.record.spec))
            return
        if change.kind == CLUSTER_SETTING.name:
            if deleted:
                self.settings.pop(change.record.name, None)
            else:
                self.settings[change.record.name] = CLUSTER_SETTING.load(change.record).spec.value
            return
        kind, records = (HYPERVISOR, self.hypervisors) if change.kind == HYPERVISOR.name else (NODE, self.members)
        if deleted:
            records.pop(change.id, None)
        else:
            records[change.id] = kind.load(change.record)

    def nodes(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The hypervisor and cluster node records by node name."""
        return (
            {h.name: h for h in self.hypervisors.values()},
            {m.name: m for m in self.members.values()},
        )


#: The kinds a placement decision reads.
_CACHED = frozenset({INSTANCE.name, HYPERVISOR.name, NODE.name, CLUSTER_SETTING.name})


class PlacementCache:
    """Every instance's node, demand and server group, in memory, with the sums per node and the members per group,
    and the nodes' ``hypervisor`` and ``node`` records: a decision must not read 3,000 instance records (``bench/scheduler_bench.py``). Loaded on first use with one
    list, then kept current by a commit hook, which runs before any writer's ``commit()`` returns (on a cluster node
    also for the changes replicated from etcd): a decision never sees less than an acknowledged write. A reset of the
    store (``hook(None)``: etcd resync) drops it; changes committed while it loads are buffered and applied on top of
    the list, in order (each carries the whole record, so the result is the newest state).

    One per store (:func:`placement_cache`); holds no reference to the store, so a closed store's goes with it."""

    def __init__(self, store: Store) -> None:
        self._index: _Index | None = None
        self._pending: list[Change] | None = None
        self._loading = asyncio.Lock()
        store.add_commit_hook(self._apply)

    def _apply(self, changes: list[Change] | None) -> None:
        if changes is None:
            self._index = None
            self._pending = None
            return
        if self._pending is not None:
            self._pending += [c for c in changes if c.kind in _CACHED]
        index = self._index
        if index is None:
            return
        for c in changes:
            if c.kind in _CACHED:
                index.apply(c)

    async def index(self, store: Store) -> _Index:
        index = self._index
        if index is not None:
            return index
        async with self._loading:
            if self._index is not None:
                return self._index
            self._pending = []
            try:
                loaded = _Index()
                for r in await list_all(store, INSTANCE.name):
                    loaded.set(r.id, _facts(r.spec))
                loaded.hypervisors = {r.id: HYPERVISOR.load(r) for r in await list_all(store, HYPERVISOR.name)}
                loaded.members = {r.id: NODE.load(r) for r in await list_all(store, NODE.name)}
                loaded.settings = {
                    r.name: CLUSTER_SETTING.load(r).spec.value for r in await list_all(store, CLUSTER_SETTING.name)
                }
                for c in self._pending:
                    loaded.apply(c)
                self._index = loaded
            finally:
                self._pending = None
            return loaded

    async def facts(self, store: Store) -> dict[str, Facts]:
        """Instance id → (node, vCPUs, memory MiB, node disk GiB, server group id)."""
        return (await self.index(store)).facts

    async def usage(self, store: Store) -> dict[str, tuple[Demand, int]]:
        """Per node: what its instances take, and how many there are."""
        return {n: (Demand(a[0], a[1], a[2]), a[3]) for n, a in (await self.index(store)).sums.items()}

    async def members(self, store: Store, group_id: str) -> list[tuple[str, str]]:
        """The (instance id, node) of the group's members."""
        return list((await self.index(store)).groups.get(group_id, {}).items())


_CACHES: weakref.WeakKeyDictionary[Any, PlacementCache] = weakref.WeakKeyDictionary()


def placement_cache(store: Store) -> PlacementCache:
    """The store's :class:`PlacementCache` (made, and its hook registered, on first use)."""
    cache = _CACHES.get(store)
    if cache is None:
        cache = _CACHES[store] = PlacementCache(store)
    return cache


async def node_usage(store: Store, node: str) -> tuple[Demand, int]:
    """What the instances placed on ``node`` take, and how many there are."""
    return (await placement_cache(store).usage(store)).get(node, (ZERO, 0))


async def cluster_setting(store: Store, name: str) -> str | None:
    """The value of the cluster-wide setting ``name`` (:data:`minicloud.cluster.kinds.SETTINGS`), None while it was
    never set (from the :class:`PlacementCache`: no store read once it is loaded, never older than an acknowledged
    ``cluster set``)."""
    return (await placement_cache(store).index(store)).settings.get(name)


async def _node_records(store: Store) -> dict[str, Any]:
    return (await placement_cache(store).index(store)).nodes()[1]


async def sched_nodes(store: Store, only: str | None = None) -> tuple[list[NodeView], dict[str, int]]:
    """Every compute node (or ``only`` that one) as a :class:`NodeView`, and each node's host CPU count (from the
    :class:`PlacementCache`: no store read once it is loaded)."""
    cache = placement_cache(store)
    by_name, members = (await cache.index(store)).nodes()
    hvs = [h for name, h in sorted(by_name.items()) if only is None or name == only]
    usage = await cache.usage(store)
    views = []
    for hv in hvs:
        used, _ = usage.get(hv.name, (ZERO, 0))
        member = members.get(hv.name)
        views.append(
            NodeView(
                capacity=NodeCapacity.of(hv.name, hv.spec),
                used=used,
                zone=member.labels.get("zone", "") if member is not None else "",
                cordoned=bool(member is not None and member.spec.cordoned),
                offline=bool(member is not None and member.status.state == "offline"),
            )
        )
    return views, {hv.name: hv.spec.cpus for hv in hvs}


async def zones(store: Store) -> dict[str, str]:
    """Node name → zone ("" for none), from the cluster's node records."""
    return {name: m.labels.get("zone", "") for name, m in (await _node_records(store)).items()}


async def list_nodes(store: Store) -> list[ComputeNode]:
    """``node list``: every compute node, and every cluster member that is not one (yet), by name."""
    hvs, members = (await placement_cache(store).index(store)).nodes()
    usage = await placement_cache(store).usage(store)
    out = []
    for name in sorted(set(hvs) | set(members)):
        hv, member = hvs.get(name), members.get(name)
        cap = NodeCapacity.of(name, hv.spec) if hv is not None else NodeCapacity(name, 0, 0, 0)
        used, count = usage.get(name, (ZERO, 0))
        out.append(
            ComputeNode(
                name=name,
                zone=member.labels.get("zone", "") if member is not None else "",
                state=member.status.state if member is not None else ("online" if hv is not None else ""),
                scheduling="cordoned" if member is not None and member.spec.cordoned else "schedulable",
                cordon_reason=member.spec.cordon_reason if member is not None else "",
                instances=count,
                vcpus_used=used.vcpus,
                vcpus=cap.vcpus,
                memory_used_mib=used.memory_mib,
                memory_mib=cap.memory_mib,
                disk_used_gib=used.disk_gib,
                disk_gib=cap.disk_gib,
            )
        )
    return out


async def _bump_placement(store: Store, node: str, stamp: str) -> Op:
    record = await store.get(PLACEMENT.name, placement_id(node))
    if record is None:
        token = PLACEMENT.new(project="", name=placement_id(node), id=placement_id(node), spec=PlacementSpec(seq=1),
                              stamp=stamp)  # fmt: skip
        return Create(PLACEMENT.dump(token))
    current = PLACEMENT.load(record)
    bumped = current.replace(spec=PlacementSpec(seq=current.spec.seq + 1), updated_at=stamp)
    return Update(PLACEMENT.dump(bumped), expect_revision=record.revision)


async def set_cordon(ctx: Context, store: Store, node: str, cordoned: bool, reason: str = "") -> Written:
    """Cordon (``cordoned=True``) or uncordon ``node``: 404 for a node the cluster does not have, 409 for a node
    running alone. Idempotent (cordoning a cordoned node updates the reason). Answers 200 with the node's
    :class:`ComputeNode`."""
    for _ in range(_ATTEMPTS):
        record = await store.get_by_name(NODE.name, "", node)
        if record is None:
            if await store.get_by_name(HYPERVISOR.name, "", node) is not None and not await _node_records(store):
                raise errors.Conflict(
                    f"node {node} runs alone (no cluster): there is no other node to place instances on, so it "
                    "cannot be cordoned; grow a cluster first (`minicloud cluster enable`)"
                )
            raise errors.NotFound(
                f"there is no node '{node[:64]}' in the cluster; see `minicloud node list`",
                invalid_params=[{"name": "node", "reason": "unknown node"}],
            )
        member = NODE.load(record)
        stamp = ctx.clock()
        spec = msgspec.structs.replace(member.spec, cordoned=cordoned, cordon_reason=reason if cordoned else "")
        updated = member.replace(spec=spec, updated_at=stamp)
        ops: list[Op] = [Update(NODE.dump(updated), expect_revision=record.revision)]
        if cordoned:
            ops.append(await _bump_placement(store, node, stamp))
        try:
            return await commit(ctx, store, ops, status=200, label="node", respond=lambda rev: None)
        except errors.PreconditionFailed:
            continue
        except errors.AlreadyExists:
            continue  # the placement record was created concurrently
    raise errors.Conflict(f"node {node} kept changing while this request ran; retry it")


async def cordon(ctx: Context, store: Store, node: str, reason: str = "") -> Written:
    """No new placements on ``node`` (what ``node drain`` calls first)."""
    return await set_cordon(ctx, store, node, True, reason)


async def uncordon(ctx: Context, store: Store, node: str) -> Written:
    """Placements on ``node`` again."""
    return await set_cordon(ctx, store, node, False)
