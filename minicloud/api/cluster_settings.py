"""``/v1/cluster/settings``: cluster-wide settings (cluster administrators only). Each handler decodes, calls the
settings service (:mod:`minicloud.cluster.settings`: validation, compare-and-swap, the node-config fallback) and
renders."""

from __future__ import annotations

from aiohttp import web

from minicloud.api import resources as res
from minicloud.api.keys import CONFIG, STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.cluster import settings as service
from minicloud.model import ClusterSetting, ClusterSettingSet

routes = Routes("cluster")


@routes.get("/v1/cluster/settings", response=list[ClusterSetting], auth=Action("cluster:settings:list"))
async def list_settings(request: web.Request) -> list[ClusterSetting]:
    """Every cluster-wide setting: the cluster's value, or (never set) this node's configuration file's."""
    return await service.list_settings(request.app[STORE], request.app[CONFIG])


@routes.get("/v1/cluster/settings/{name}", response=ClusterSetting, auth=Action("cluster:settings:get"))
async def get_setting(request: web.Request) -> Reply:
    """One cluster-wide setting (its revision is the ETag for ``If-Match``)."""
    shown = await service.get_setting(request.app[STORE], request.app[CONFIG], request.match_info["name"])
    return Reply(shown, 200, res.etag(shown.revision))


@routes.route(
    "PUT",
    "/v1/cluster/settings/{name}",
    body=ClusterSettingSet,
    response=ClusterSetting,
    auth=Action("cluster:settings:update"),
)
async def set_setting(request: web.Request, body: ClusterSettingSet) -> Reply:
    """Set a cluster-wide setting: every node applies the value from now on, whatever its configuration file says.
    ``If-Match`` makes it conditional (``"0"``: only if it was never set)."""
    ctx = await res.context_of(request)
    written = await service.set_setting(
        ctx, request.app[STORE], request.match_info["name"], body.value, expect=res.if_match(request)
    )
    return res.reply(request, written)


@routes.delete("/v1/cluster/settings/{name}", status=204, auth=Action("cluster:settings:delete"))
async def unset_setting(request: web.Request) -> Reply:
    """Unset a cluster-wide setting: each node uses its configuration file's value again (204 also when unset)."""
    ctx = await res.context_of(request)
    written = await service.unset_setting(
        ctx, request.app[STORE], request.match_info["name"], expect=res.if_match(request)
    )
    if written.revision == 0:  # nothing was set: nothing written, nothing audited by the service
        return Reply(None, 204)
    return res.reply(request, written)
