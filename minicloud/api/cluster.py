"""``/v1/cluster``: grow from one node to a cluster, see its members and leader, remove or promote nodes."""

from __future__ import annotations

from aiohttp import web

from minicloud.api.keys import CLUSTER
from minicloud.api.routing import PUBLIC, Action, Reply, Routes
from minicloud.model import (
    ClusterEnable,
    ClusterInfo,
    ClusterJoin,
    ClusterMember,
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
    members = [ClusterMember(**m) for m in await cluster.members()]
    return ClusterInfo(
        enabled=True,
        node=cluster.name,
        leader=cluster.leader,
        etcd_leader=await cluster.etcd_leader(),
        quorum=await cluster.quorum_ok(),
        revision=cluster.store.revision,
        members=members,
        storage=await cluster.storage(),
    )


@routes.get("/v1/cluster", response=ClusterInfo, auth=Action("cluster:get"))
async def show_cluster(request: web.Request) -> ClusterInfo:
    """The cluster: members, their roles and liveness, and the services leader."""
    return await _info(request)


@routes.post("/v1/cluster/enable", body=ClusterEnable, response=ClusterInfo, auth=Action("cluster:enable"))
async def enable_cluster(request: web.Request, body: ClusterEnable) -> ClusterInfo:
    """Turn this single node into a one-member cluster (etcd), keeping every record."""
    await request.app[CLUSTER].enable(body.zone)
    return await _info(request)


@routes.post("/v1/cluster/recover", response=ClusterInfo, auth=Action("cluster:recover"))
async def recover_cluster(request: web.Request) -> ClusterInfo:
    """After permanent quorum loss: continue as a one-member cluster from this node's data."""
    await request.app[CLUSTER].recover()
    return await _info(request)


@routes.post(
    "/v1/cluster/tokens",
    body=JoinTokenCreate,
    response=JoinTokenIssued,
    status=201,
    auth=Action("cluster:tokens:create"),
)
async def create_join_token(request: web.Request, body: JoinTokenCreate) -> JoinTokenIssued:
    """Create a one-time token with which node `node` can join."""
    token, record = await request.app[CLUSTER].issue_token(body.node, body.role, body.ttl, body.zone)
    return JoinTokenIssued(token=token, node=body.node, expires_at=record.expires_at)


@routes.post("/v1/cluster/join", body=ClusterJoin, response=ClusterInfo, auth=Action("cluster:join"))
async def join_cluster(request: web.Request, body: ClusterJoin) -> ClusterInfo:
    """Join the cluster a token points to. This node's own state is replaced by the cluster's."""
    await request.app[CLUSTER].join(body.token)
    return await _info(request)


@routes.post("/v1/cluster/join-requests", body=JoinRequest, response=JoinReply, auth=PUBLIC)
async def admit_node(request: web.Request, body: JoinRequest) -> JoinReply:
    """Node-to-node: admit a joining node (authenticated by its one-time join token)."""
    reply = await request.app[CLUSTER].admit(
        body.token, body.csr, body.node, body.client_time, body.peer_url, body.client_url, body.address
    )
    return JoinReply(**reply)


@routes.post("/v1/cluster/members/{name}/promote", auth=Action("cluster:members:promote"), status=204)
async def promote_member(request: web.Request) -> Reply:
    """Make a learner a voting etcd member."""
    await request.app[CLUSTER].promote(request.match_info["name"])
    return Reply(None, 204)


@routes.delete("/v1/cluster/members/{name}", auth=Action("cluster:members:delete"), status=204)
async def remove_member(request: web.Request) -> Reply:
    """Remove a node from the cluster (a dead one, typically)."""
    await request.app[CLUSTER].remove(request.match_info["name"])
    return Reply(None, 204)
