"""``/v1/cluster``: grow from one node to a cluster, see its members and leader, remove or promote nodes.

The services are :class:`minicloud.cluster.node.ClusterNode`'s methods (the node's part in the cluster, owned by the
agent): each takes the request's :class:`~minicloud.core.context.Context`, and the record writes it makes (node and
join-token records) commit through :func:`minicloud.core.write.commit` with their audit entry.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from minicloud.api import resources as res
from minicloud.api.keys import CLUSTER
from minicloud.api.routing import PUBLIC, Action, Reply, Routes
from minicloud.core.write import Written
from minicloud.model import (
    ClusterEnable,
    ClusterInfo,
    ClusterJoin,
    JoinReply,
    JoinRequest,
    JoinTokenCreate,
    JoinTokenIssued,
)

routes = Routes("cluster")


async def _info(request: web.Request) -> ClusterInfo:
    cluster = request.app[CLUSTER]
    if not cluster.enabled:
        return ClusterInfo(enabled=False, node=cluster.name, leader=cluster.name, revision=cluster.store.revision)
    return ClusterInfo(
        enabled=True,
        node=cluster.name,
        leader=cluster.leader,
        etcd_leader=await cluster.etcd_leader(),
        quorum=await cluster.quorum_ok(),
        revision=cluster.store.revision,
        members=await cluster.members(),
        storage=await cluster.storage(),
    )


def _answer(request: web.Request, written: Written | None, body: Any = None, status: int = 200) -> Reply:
    """``body`` as the answer; when the service committed a record change (audited in its transaction), say so,
    so the request is not audited twice."""
    if written is None:
        return Reply(body, status)
    return res.reply(request, dataclasses.replace(written, body=body, status=status))


@routes.get("/v1/cluster", response=ClusterInfo, auth=Action("cluster:get"))
async def show_cluster(request: web.Request) -> ClusterInfo:
    """The cluster: members, their roles and liveness, and the services leader."""
    return await _info(request)


@routes.post("/v1/cluster/enable", body=ClusterEnable, response=ClusterInfo, auth=Action("cluster:enable"))
async def enable_cluster(request: web.Request, body: ClusterEnable) -> Reply:
    """Turn this single node into a one-member cluster (etcd), keeping every record."""
    written = await request.app[CLUSTER].enable(await res.context_of(request), body.zone)
    return _answer(request, written, await _info(request))


@routes.post("/v1/cluster/recover", response=ClusterInfo, auth=Action("cluster:recover"))
async def recover_cluster(request: web.Request) -> Reply:
    """After permanent quorum loss: continue as a one-member cluster from this node's data."""
    written = await request.app[CLUSTER].recover(await res.context_of(request))
    return _answer(request, written, await _info(request))


@routes.post(
    "/v1/cluster/tokens",
    body=JoinTokenCreate,
    response=JoinTokenIssued,
    status=201,
    auth=Action("cluster:tokens:create"),
)
async def create_join_token(request: web.Request, body: JoinTokenCreate) -> Reply:
    """Create a one-time token with which node `node` can join."""
    ctx = await res.context_of(request)
    written = await request.app[CLUSTER].issue_token(ctx, body.node, body.role, body.ttl, body.zone)
    return res.reply(request, written)


@routes.post("/v1/cluster/join", body=ClusterJoin, response=ClusterInfo, auth=Action("cluster:join"))
async def join_cluster(request: web.Request, body: ClusterJoin) -> ClusterInfo:
    """Join the cluster a token points to. This node's own state is replaced by the cluster's."""
    await request.app[CLUSTER].join(body.token)
    return await _info(request)


@routes.post("/v1/cluster/join-requests", body=JoinRequest, response=JoinReply, auth=PUBLIC)
async def admit_node(request: web.Request, body: JoinRequest) -> Reply:
    """Node-to-node: admit a joining node (authenticated by its one-time join token)."""
    written = await request.app[CLUSTER].admit(
        await res.context_of(request),
        body.token,
        body.csr,
        body.node,
        body.client_time,
        body.peer_url,
        body.client_url,
        body.address,
        body.https,
    )
    return _answer(request, written, written.body)


@routes.post("/v1/cluster/members/{name}/promote", auth=Action("cluster:members:promote"), status=204)
async def promote_member(request: web.Request) -> Reply:
    """Make a learner a voting etcd member."""
    await request.app[CLUSTER].promote(request.match_info["name"])
    return Reply(None, 204)


@routes.delete("/v1/cluster/members/{name}", auth=Action("cluster:members:delete"), status=204)
async def remove_member(request: web.Request) -> Reply:
    """Remove a node from the cluster (a dead one, typically)."""
    written = await request.app[CLUSTER].remove(await res.context_of(request), request.match_info["name"])
    return _answer(request, written, status=204)
