"""SDK for cluster-wide settings: ``client.cluster_settings`` (cluster administrators)."""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING

from minicloud.model import ClusterSetting

if TYPE_CHECKING:
    from minicloud.client import Client


def _q(ref: str) -> str:
    return urllib.parse.quote(ref, safe="")


class ClusterSettings:
    """``/v1/cluster/settings``: settings every node applies alike (``scheduler-weigher``: ``spread`` or ``pack``).
    A setting never set is each node's configuration file's (``source`` ``node-config``)."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self) -> list[ClusterSetting]:
        return self._c.call("GET", "/v1/cluster/settings", list[ClusterSetting])

    def get(self, name: str) -> ClusterSetting:
        return self._c.call("GET", f"/v1/cluster/settings/{_q(name)}", ClusterSetting)

    def set(self, name: str, value: str, *, if_match: int | None = None) -> ClusterSetting:
        """Set ``name`` for the whole cluster; ``if_match``: only at that revision (0: only if never set)."""
        headers = {"If-Match": f'"{if_match}"'} if if_match is not None else None
        return self._c.call(
            "PUT", f"/v1/cluster/settings/{_q(name)}", ClusterSetting, json={"value": value}, headers=headers
        )

    def unset(self, name: str) -> None:
        """Back to each node's configuration file (no error when it was not set)."""
        self._c.call("DELETE", f"/v1/cluster/settings/{_q(name)}")
