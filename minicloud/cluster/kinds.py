"""The cluster's resource kinds, declared once (see :mod:`minicloud.core.kinds`): a ``node`` record per member and
a ``jointoken`` record per outstanding join token. Both are internal (no view): clients see nodes through
``GET /v1/cluster`` (:class:`minicloud.model.ClusterMember`, which also reads etcd's membership and the heartbeat
leases), never as records, and the events stream never carries them.

Growth (CONVENTIONS 22): one ``node`` record per member, removed by ``cluster remove``/``recover``; a ``jointoken``
is deleted by the join that consumes it (an unused one stays until the node is added or removed; at most one
outstanding token per node name is useful, and tokens expire after at most 7 days).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from minicloud.core.kinds import Column, Kind, declare

Role = Literal["voter", "learner", "auto"]


# -- nodes ---------------------------------------------------------------------------------------------------------
class NodeSpec(msgspec.Struct, kw_only=True):
    #: The address other nodes reach this one on.
    address: str
    #: What was asked for when it joined (etcd's membership is the truth once the node is a member).
    role: str = "voter"
    #: Its HTTPS base URL ("" until it has registered it).
    https: str = ""


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
