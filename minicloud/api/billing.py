"""``/v1/billing/…``, ``/v1/prices``, ``/v1/invoices``: meters, the price catalogue, ledger verification and invoices
(docs/billing.md). Project members, owners and viewers read their project's figures (``billing:*`` reads); setting
prices and closing invoices are granted to no project role (admins only)."""

from __future__ import annotations

from aiohttp import web

from minicloud.api import resources as res
from minicloud.api.auth import authorize, principal_of
from minicloud.api.keys import CONFIG, STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.billing import invoices, ledger, prices
from minicloud.billing.meters import METERS
from minicloud.model.billing import (
    Invoice,
    InvoiceQuery,
    InvoiceSummary,
    LedgerVerification,
    MeterInfo,
    Price,
    PriceQuery,
    PriceSet,
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
