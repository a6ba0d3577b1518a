"""``/v1/billing/…``, ``/v1/prices``, ``/v1/invoices``, ``/v1/costs``: meters, the price catalogue, ledger
verification, invoices, budgets, cost reports and the FOCUS export (docs/billing.md). Project members, owners and viewers read their project's figures (``billing:*`` reads); setting
prices, closing invoices and setting budgets are granted to no project role (admins only)."""

from __future__ import annotations

from aiohttp import web

from minicloud.api import resources as res
from minicloud.api.auth import authorize, principal_of
from minicloud.api.keys import CONFIG, STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.billing import budgets, costs, invoices, ledger, policies, prices, recommendations
from minicloud.billing.meters import METERS
from minicloud.model.billing import (
    Budget,
    BudgetCreate,
    CostQuery,
    CostReport,
    FocusQuery,
    Invoice,
    InvoiceQuery,
    InvoiceSummary,
    LedgerVerification,
    MeterInfo,
    Policy,
    PolicyCreate,
    Price,
    PriceQuery,
    PriceSet,
    RecommendationQuery,
    Recommendations,
    Verifications,
    VerifyQuery,
)

routes = Routes("billing")


@routes.get("/v1/billing/meters", response=list[MeterInfo], auth=Action("billing:meters:list"))
async def list_meters(request: web.Request) -> list[MeterInfo]:
    """The meters usage is measured in, with their units."""
    return [
        MeterInfo(name=m.name, service=m.service, unit=m.unit, pricing_unit=m.pricing_unit, description=m.description)
        for m in METERS.values()
    ]


@routes.get("/v1/prices", query=PriceQuery, response=list[Price], auth=Action("billing:prices:list"))
async def list_prices(request: web.Request, query: PriceQuery) -> list[Price]:
    """Every price version, by meter and effective date."""
    return await prices.list_prices(request.app[STORE], query.meter)


@routes.post("/v1/prices", body=PriceSet, response=Price, status=201, auth=Action("billing:prices:create"))
async def set_price(request: web.Request, body: PriceSet) -> Reply:
    """Add a version of a meter's price (in force from the next hour, or a later --effective). Prices apply to every
    project: only a cluster-wide grant allows it, never one bound in a project."""
    await authorize(request, principal_of(request), "billing:prices:create", "", cluster=True)
    ctx = await res.context_of(request)
    written = await prices.set_price(
        ctx, request.app[STORE], body, currency=request.app[CONFIG].billing.currency, now=invoices.now_utc()
    )
    return res.reply(request, written)


@routes.get("/v1/billing/verify", query=VerifyQuery, response=Verifications, auth=Action("billing:ledger:get"))
async def verify(request: web.Request, query: VerifyQuery) -> Verifications:
    """Recompute the project's ledger hash chain (``all``: every project's, admins) and name the first bad entry."""
    store = request.app[STORE]
    if query.all:
        await authorize(request, principal_of(request), "admin:billing:verify", "", cluster=True)
        projects = await ledger.ledger_projects(store)
    else:
        projects = [res.project_of(request)]
    results = []
    for project in projects:
        v = await ledger.verify(store, project)
        results.append(LedgerVerification(project=v.project, entries=v.entries, ok=v.ok, first_bad_seq=v.first_bad_seq,
                                          first_bad_id=v.first_bad_id, reason=v.reason))  # fmt: skip
    return Verifications(ok=all(r.ok for r in results), projects=results)


@routes.get("/v1/invoices", response=list[InvoiceSummary], auth=Action("billing:invoices:list"))
async def list_invoices(request: web.Request) -> list[InvoiceSummary]:
    """The project's closed invoices and the current month's open one."""
    return await invoices.list_invoices(request.app[STORE], res.project_of(request), invoices.now_utc())


@routes.get("/v1/invoices/{period}", query=InvoiceQuery, response=Invoice, auth=Action("billing:invoices:get"))
async def show_invoice(request: web.Request, query: InvoiceQuery) -> Invoice | web.Response:
    """One month's invoice (closed: as stored; open: as it stands), as JSON or ``?format=csv``."""
    invoice, _ = await invoices.show(request.app[STORE], res.project_of(request), request.match_info["period"])
    if query.format == "csv":
        return web.Response(text=invoices.to_csv(invoice), content_type="text/csv")
    return invoice


@routes.post("/v1/invoices/{period}/close", response=Invoice, status=201, auth=Action("billing:invoices:close"))
async def close_invoice(request: web.Request) -> Reply:
    """Close a past month's invoice: stored with its sha256, never changed again."""
    ctx = await res.context_of(request)
    written = await invoices.close_invoice(ctx, request.app[STORE], request.match_info["period"], invoices.now_utc())
    return res.reply(request, written)


async def _projects(request: web.Request, every: bool, action: str) -> list[str]:
    """The request's project, or with ``every`` every project with a ledger (a cluster-wide grant of ``action``)."""
    if every:
        await authorize(request, principal_of(request), action, "", cluster=True)
        return await ledger.ledger_projects(request.app[STORE])
    return [res.project_of(request)]


@routes.get("/v1/costs", query=CostQuery, response=CostReport, auth=Action("billing:costs:get"))
async def cost_report(request: web.Request, query: CostQuery) -> CostReport:
    """Charges grouped by service, resource, project, node or a label, per day or month, and the forecast to the
    end of the month (``all``: every project, administrators)."""
    projects = await _projects(request, query.all, "admin:billing:costs")
    return await costs.cost_report(
        request.app[STORE], projects, since=query.since, group_by=query.group_by, granularity=query.granularity,
        now=invoices.now_utc(),
    )  # fmt: skip


@routes.get("/v1/costs/focus", query=FocusQuery, auth=Action("billing:costs:get"))
async def focus_export(request: web.Request, query: FocusQuery) -> web.StreamResponse:
    """The period's charges as a FOCUS 1.2 CSV (one row per hourly charge on the period's invoice), streamed: one
    project's charges in memory at a time."""
    projects = await _projects(request, query.all, "admin:billing:costs")
    chunks = costs.focus_chunks(
        request.app[STORE], projects, query.period, currency=request.app[CONFIG].billing.currency
    )
    first = await anext(chunks)  # a bad period is refused (422) before the answer starts
    resp = web.StreamResponse(headers={"Content-Type": "text/csv; charset=utf-8", "Cache-Control": "no-store"})
    await resp.prepare(request)
    await resp.write(first.encode())
    async for chunk in chunks:
        await resp.write(chunk.encode())
    await resp.write_eof()
    return resp


@routes.post("/v1/budgets", body=BudgetCreate, response=Budget, status=201, auth=Action("billing:budgets:create"))
async def create_budget(request: web.Request, body: BudgetCreate) -> Reply:
    """A monthly budget of the project (administrators): thresholds notify through an alarm's webhooks; ``enforce``
    refuses new billable resources once it is spent."""
    ctx = await res.context_of(request)
    written = await budgets.create(ctx, request.app[STORE], body, currency=request.app[CONFIG].billing.currency)
    return res.reply(request, written)


@routes.get("/v1/budgets", response=list[Budget], auth=Action("billing:budgets:list"))
async def list_budgets(request: web.Request) -> list[Budget]:
    """The project's budgets with this month's spend, forecast and thresholds crossed."""
    return await budgets.list_budgets(request.app[STORE], res.project_of(request))


@routes.get("/v1/budgets/{name}", response=Budget, auth=Action("billing:budgets:get"))
async def show_budget(request: web.Request) -> Budget:
    return budgets.view(await budgets.get(request.app[STORE], res.project_of(request), request.match_info["name"]))


@routes.delete("/v1/budgets/{name}", status=204, auth=Action("billing:budgets:delete"))
async def delete_budget(request: web.Request) -> Reply:
    ctx = await res.context_of(request)
    written = await budgets.delete(ctx, request.app[STORE], request.match_info["name"])
    return res.reply(request, written)


@routes.get(
    "/v1/costs/recommendations", query=RecommendationQuery, response=Recommendations,
    auth=Action("billing:recommendations:list"),
)  # fmt: skip
async def cost_recommendations(request: web.Request, query: RecommendationQuery) -> Recommendations:
    """Idle instances, rightsizing, unattached volumes, old snapshots and unassociated floating IPs of the project,
    each with its evidence and monthly saving (docs/billing.md)."""
    return await recommendations.for_project(
        request, res.project_of(request), days=query.days, snapshot_days=query.snapshot_days, idle_cpu=query.idle_cpu
    )


@routes.post("/v1/policies", body=PolicyCreate, response=Policy, status=201, auth=Action("compute:policies:create"))
async def create_policy(request: web.Request, body: PolicyCreate) -> Reply:
    """An auto-stop policy: stop running instances of the label selector once idle for ``idle`` seconds; with
    ``dry_run``, nothing is stored and the answer lists what it would stop now."""
    from minicloud.api import metrics as metrics_api

    ctx = await res.context_of(request)
    result = await policies.create(
        ctx, request.app[STORE], body, query=request.app.get(metrics_api.QUERY),
        scrape_interval=request.app[CONFIG].metrics.scrape_interval, now=invoices.now_utc(),
    )  # fmt: skip
    return Reply(result, 200) if isinstance(result, Policy) else res.reply(request, result)  # a dry run stores nothing


@routes.get("/v1/policies", response=list[Policy], auth=Action("compute:policies:list"))
async def list_policies(request: web.Request) -> list[Policy]:
    """The project's policies with their latest actions."""
    return await policies.list_policies(request.app[STORE], res.project_of(request))


@routes.get("/v1/policies/{name}", response=Policy, auth=Action("compute:policies:get"))
async def show_policy(request: web.Request) -> Policy:
    return policies.view(await policies.get(request.app[STORE], res.project_of(request), request.match_info["name"]))


@routes.delete("/v1/policies/{name}", status=204, auth=Action("compute:policies:delete"))
async def delete_policy(request: web.Request) -> Reply:
    ctx = await res.context_of(request)
    return res.reply(request, await policies.delete(ctx, request.app[STORE], request.match_info["name"]))
