"""``/v1/alarms``: create (checked by the TSDB's parser and the webhook URL rule; answers the one-time webhook secret)
and the history; list, show, update (description, labels) and delete come from the kind's declaration. The services
leader evaluates alarms (``minicloud.observe.alarm_loop``)."""

from __future__ import annotations

from aiohttp import web

from minicloud.api import generic
from minicloud.api import resources as res
from minicloud.api.accesskeys import KEYSTORE
from minicloud.api.keys import CONFIG, STORE
from minicloud.api.metrics import QUERY
from minicloud.api.routing import Action, Reply, Routes
from minicloud.compute.url_policy import UrlPolicy
from minicloud.model.alarms import AlarmCreate, AlarmCreated, AlarmHistoryPage, AlarmHistoryQuery
from minicloud.observe import alarms
from minicloud.observe.kinds import ALARM

routes = Routes("alarms")


@routes.post("/v1/alarms", body=AlarmCreate, response=AlarmCreated, status=201, auth=Action("metrics:alarms:create"))
async def create_alarm(request: web.Request, body: AlarmCreate) -> Reply:
    """Create an alarm over the project's series; the answer holds its webhook secret, shown this once."""
    app = request.app
    config = app[CONFIG].alarms
    written = await alarms.create_alarm(
        await res.context_of(request),
        app[STORE],
        body,
        service=app.get(QUERY),
        sealer=app[KEYSTORE],
        policy=UrlPolicy.from_config(config.webhook_allow),
        quota=config.quota_per_project,
    )
    return res.reply(request, written)


@routes.get(
    "/v1/alarms/{ref}/history",
    query=AlarmHistoryQuery,
    response=AlarmHistoryPage,
    auth=Action("metrics:alarms:history:list"),
)
async def alarm_history(request: web.Request, query: AlarmHistoryQuery) -> AlarmHistoryPage:
    """An alarm's state changes and delivery attempts, newest first (kept ``alarms.history_days``)."""
    ctx = await res.context_of(request)
    return await alarms.alarm_history(
        ctx, request.app[STORE], request.match_info["ref"], limit=query.limit, cursor=query.cursor
    )


generic.add_crud_routes(routes, ALARM)
