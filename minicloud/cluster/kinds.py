"""The cluster's resource kinds, declared once (see :mod:`minicloud.core.kinds`): a ``node`` record per member,
a ``jointoken`` record per outstanding join token and a ``clustersetting`` record per cluster-wide setting that was
set. Nodes and join tokens are internal (no view): clients see nodes through ``GET /v1/cluster``
(:class:`minicloud.model.ClusterMember`, which also reads etcd's membership and the heartbeat leases), never as
records, and the events stream never carries them. Settings are public (administrators see their changes streamed).

Growth (CONVENTIONS 22): one ``node`` record per member, removed by ``cluster remove``/``recover``; a ``jointoken``
is deleted by the join that consumes it (an unused one stays until the node is added or removed; at most one
outstanding token per node name is useful, and tokens expire after at most 7 days); at most one
``clustersetting`` per entry of :data:`SETTINGS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from minicloud.core.kinds import Column, Kind, Obj, declare
from minicloud.model import ClusterSetting

Role = Literal["voter", "learner", "auto"]


# -- nodes ---------------------------------------------------------------------------------------------------------
class NodeSpec(msgspec.Struct, kw_only=True):
    #: The address other nodes reach this one on.
    address: str
    #: What was asked for when it joined (etcd's membership is the truth once the node is a member).
    role: str = "voter"
    #: Its HTTPS base URL ("" until it has registered it).
    https: str = ""
    #: ``node cordon``: the scheduler places nothing new here (:mod:`minicloud.compute.nodes`), and why.
    cordoned: bool = False
    cordon_reason: str = ""


class NodeStatus(msgspec.Struct, kw_only=True):
    """Written by the services leader on each online/offline transition (not per heartbeat)."""

    #: ``online``, ``offline``, or "" before the leader has seen the node.
    state: str = ""
    #: When it came online (its heartbeat lease's ``since``).
    since: str | None = None
    #: The last contact of a node that went offline.
    last_contact: str | None = None


#: One per cluster member (the node's name is the record's name; its zone the label ``zone``).
NODE = declare(
    Kind(
        name="node",
        plural="nodes",
        prefix="node",
        spec=NodeSpec,
        status=NodeStatus,
        scope="cluster",
        action="cluster:members",
        noun="cluster",
        title="node",
        # ``minicloud cluster list`` (its rows are ``minicloud.model.ClusterMember``).
        columns=(
            Column("name", "name"),
            Column("address", "address"),
            Column("zone", "zone"),
            Column("role", "role"),
            Column("status", "status"),
            Column("online since", "online_since"),
            Column("last contact", "last_contact"),
            Column("leader", "leader"),
        ),
        generic=frozenset(),
    )
)


# -- join tokens ---------------------------------------------------------------------------------------------------
class JoinTokenSpec(msgspec.Struct, kw_only=True):
    """What the cluster stores for an outstanding join token (:class:`minicloud.cluster.join.JoinTokenRecord` plus
    the role and zone the node gets): never the secret, only its SHA-256."""

    token_id: str
    node: str
    secret_sha256: str
    issued_at: str
    expires_at: str
    role: str = "voter"
    zone: str = ""


#: One-time join tokens (the record's id and name are the token id).
JOINTOKEN = declare(
    Kind(
        name="jointoken",
        plural="jointokens",
        prefix="jt",
        spec=JoinTokenSpec,
        scope="cluster",
        action="cluster:tokens",
        title="join token",
        generic=frozenset(),
    )
)


# -- cluster-wide settings -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SettingDef:
    """A setting the cluster knows: the values it takes and the configuration key each node falls back on."""

    name: str
    choices: tuple[str, ...]
    #: ``section.key`` of ``minicloud.toml`` that applies while the setting was never set.
    config_key: str
    description: str


SCHEDULER_WEIGHER = "scheduler-weigher"

#: Every cluster-wide setting, by name (``minicloud cluster set NAME VALUE``). To add one: an entry here, and the
#: service that reads it asks :func:`minicloud.cluster.settings.effective` (or the placement cache's copy).
SETTINGS: dict[str, SettingDef] = {
    s.name: s
    for s in (
        SettingDef(
            SCHEDULER_WEIGHER,
            ("spread", "pack"),
            "compute.scheduler_weigher",
            "how the scheduler orders the nodes that can take an instance: spread (most free memory first) or pack "
            "(least: fill one node before the next)",
        ),
    )
}


class ClusterSettingSpec(msgspec.Struct, kw_only=True):
    #: One of the setting's :attr:`SettingDef.choices` (checked by the service when it is set).
    value: str


def _render_setting(obj: Obj[ClusterSettingSpec, Any]) -> ClusterSetting:
    known = SETTINGS.get(obj.name)
    return ClusterSetting(
        name=obj.name,
        value=obj.spec.value,
        source="cluster",
        config_key=known.config_key if known else "",
        choices=list(known.choices) if known else [],
        description=known.description if known else "",
        id=obj.id,
        revision=obj.revision,
        updated_at=obj.updated_at,
    )


#: One record per setting that was set (id ``cset-<name>``, named after the setting); deleting it (``cluster unset``)
#: gives each node its configuration file's value back. Served by ``/v1/cluster/settings`` (not the generic routes).
CLUSTER_SETTING = declare(
    Kind(
        name="clustersetting",
        plural="cluster-settings",
        prefix="cset",
        spec=ClusterSettingSpec,
        scope="cluster",
        action="cluster:settings",
        view=ClusterSetting,
        render=_render_setting,
        noun="cluster",
        title="cluster setting",
        columns=(
            Column("name", "name"),
            Column("value", "value"),
            Column("source", "source"),
            Column("config key", "config_key"),
            Column("choices", "choices"),
        ),
        generic=frozenset(),
    )
)
