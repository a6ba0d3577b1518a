"""What ``/v1/logs`` reads from the store: a project's instances (whose consoles its members may read) and the
cluster's nodes (whom the merging node asks, and whose certificates the node endpoint accepts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from minicloud.cluster.kinds import NODE
from minicloud.compute.kinds import INSTANCE
from minicloud.state import Store, list_all


async def project_instance_ids(store: Store, project: str) -> set[str]:
    """The ids of ``project``'s instances (indexed by project)."""
    return {r.id for r in await list_all(store, INSTANCE.name, project=project)}


def own_https_port(data_path: Path) -> int | None:
    """The port this agent's HTTPS listener is on (``agent.json``), None when it has none."""
    try:
        address = json.loads((data_path / "agent.json").read_text()).get("https") or ""
        return int(address.rsplit(":", 1)[1]) if address else None
    except (OSError, ValueError, IndexError):
        return None


def https_of(spec: Any, fallback_port: int | None) -> str:
    """A node's HTTPS base URL: the one it registered, else its address on ``fallback_port`` (this node's own port:
    a node that joined a cluster is recorded with its address only, and nodes of a cluster listen alike)."""
    if spec.https:
        return str(spec.https).rstrip("/")
    if not spec.address or fallback_port is None:
        return ""
    host = str(spec.address)
    return f"https://[{host}]:{fallback_port}" if ":" in host else f"https://{host}:{fallback_port}"


async def other_nodes(
    store: Store, me: str, fallback_port: int | None = None, *, voters_only: bool = False
) -> list[tuple[str, str]]:
    """``(name, https base URL)`` of every node of the cluster but ``me`` (:func:`https_of`; empty when unknown);
    with ``voters_only``, of the voting nodes that have a URL (those run a TSDB)."""
    out = []
    for record in await list_all(store, NODE.name):
        node = NODE.load(record)
        if node.name == me or (voters_only and node.spec.role != "voter"):
            continue
        url = https_of(node.spec, fallback_port)
        if url or not voters_only:
            out.append((node.name, url))
    return out


async def is_node(store: Store, name: str) -> bool:
    return await store.get_by_name(NODE.name, "", name) is not None
