"""What ``/v1/logs`` reads from the store: a project's instances (whose consoles its members may read) and the
cluster's nodes (whom the merging node asks, and whose certificates the node endpoint accepts)."""

from __future__ import annotations

from minicloud.cluster.kinds import NODE
from minicloud.compute.kinds import INSTANCE
from minicloud.state import Store, list_all


async def project_instance_ids(store: Store, project: str) -> set[str]:
    """The ids of ``project``'s instances (indexed by project)."""
    return {r.id for r in await list_all(store, INSTANCE.name, project=project)}


async def other_nodes(store: Store, me: str) -> list[tuple[str, str]]:
    """``(name, https base URL)`` of every node of the cluster but ``me`` (the URL is empty until it registered)."""
    out = []
    for record in await list_all(store, NODE.name):
        node = NODE.load(record)
        if node.name != me:
            out.append((node.name, node.spec.https))
    return out


async def is_node(store: Store, name: str) -> bool:
    return await store.get_by_name(NODE.name, "", name) is not None
