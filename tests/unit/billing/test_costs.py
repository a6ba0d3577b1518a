"""Cost reports, the forecast and the FOCUS 1.2 export, from a ledger the real metering loops wrote (fake clock).

The FOCUS test checks the CSV against the specification's own column definitions (FOCUS 1.2, "Column definitions"):
for each column written, its presence, data type (Decimal, Date/Time, String, JSON key-value), whether it may be null
and its allowed values; and the cross-column rules that apply to usage charges without commitments.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import re
from decimal import Decimal

import pytest

from minicloud import errors
from minicloud.billing import costs, invoices
from minicloud.core.context import Context
from tests.unit.billing.test_metering import VCPU, Clock, Meter, at, instance, put, set_price, store  # noqa: F401

# -- FOCUS 1.2 column definitions (feature level, data type, nulls allowed, allowed values) ---------------------------
CHARGE_CATEGORIES = {"Usage", "Purchase", "Tax", "Credit", "Adjustment"}
SERVICE_CATEGORIES = {
    "AI and Machine Learning", "Analytics", "Business Applications", "Compute", "Databases", "Developer Tools",
    "Multicloud", "Identity", "Integration", "Internet of Things", "Management and Governance", "Media", "Migration",
    "Mobile", "Networking", "Security", "Storage", "Web", "Other",
}  # fmt: skip
SPEC: dict[str, tuple[str, str, bool, set[str] | None]] = {
    # mandatory (21)
    "BilledCost": ("Mandatory", "Decimal", False, None),
    "BillingAccountId": ("Mandatory", "String", False, None),
    "BillingAccountName": ("Mandatory", "String", False, None),  # null only where names are unsupported
    "BillingCurrency": ("Mandatory", "Currency", False, None),
    "BillingPeriodEnd": ("Mandatory", "DateTime", False, None),
    "BillingPeriodStart": ("Mandatory", "DateTime", False, None),
    "ChargeCategory": ("Mandatory", "String", False, CHARGE_CATEGORIES),
    "ChargeClass": ("Mandatory", "String", True, {"Correction"}),
    "ChargeDescription": ("Mandatory", "String", False, None),  # SHOULD NOT be null
    "ChargePeriodEnd": ("Mandatory", "DateTime", False, None),
    "ChargePeriodStart": ("Mandatory", "DateTime", False, None),
    "ContractedCost": ("Mandatory", "Decimal", False, None),
    "EffectiveCost": ("Mandatory", "Decimal", False, None),
    "InvoiceIssuerName": ("Mandatory", "String", False, None),
    "ListCost": ("Mandatory", "Decimal", False, None),
    "PricingQuantity": ("Mandatory", "Decimal", True, None),
    "PricingUnit": ("Mandatory", "String", True, None),
    "ProviderName": ("Mandatory", "String", False, None),
    "PublisherName": ("Mandatory", "String", False, None),
    "ServiceCategory": ("Mandatory", "String", False, SERVICE_CATEGORIES),
    "ServiceName": ("Mandatory", "String", False, None),
    # conditional / recommended ones written
    "AvailabilityZone": ("Recommended", "String", True, None),
    "BillingAccountType": ("Conditional", "String", False, None),
    "ChargeFrequency": ("Recommended", "String", False, {"One-Time", "Recurring", "Usage-Based"}),
    "ConsumedQuantity": ("Conditional", "Decimal", False, None),  # not null for Usage that is not a Correction
    "ConsumedUnit": ("Conditional", "String", False, None),
    "ContractedUnitPrice": ("Conditional", "Decimal", False, None),
    "InvoiceId": ("Recommended", "String", True, None),
    "ListUnitPrice": ("Conditional", "Decimal", False, None),
    "PricingCategory": ("Conditional", "String", False, {"Standard", "Dynamic", "Committed", "Other"}),
    "ResourceId": ("Conditional", "String", False, None),
    "ResourceName": ("Conditional", "String", True, None),
    "ResourceType": ("Conditional", "String", False, None),
    "SkuId": ("Conditional", "String", False, None),
    "SkuPriceId": ("Conditional", "String", True, None),
    "Tags": ("Conditional", "KeyValue", False, None),
}
MANDATORY_21 = [c for c, (level, *_rest) in SPEC.items() if level == "Mandatory"]
DATETIME = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")  # ISO 8601 UTC, "Z"
DECIMAL = re.compile(r"^-?[0-9]+(\.[0-9]+)?$")  # numeric, no units, currency symbols or exponent
CURRENCY = re.compile(r"^[A-Z]{3}$")  # ISO 4217
CUSTOM = re.compile(r"^x_[A-Za-z0-9]+$")  # custom columns carry the x_ prefix
UNIT = re.compile(r"^(1000 )?[A-Za-z ]+(-Hours)?$")  # FOCUS unit format: "<unit>-Hours" for time-based units


def check_focus(text: str) -> list[dict[str, str]]:
    rows = list(csv.DictReader(io.StringIO(text)))
    header = next(csv.reader(io.StringIO(text)))
    assert len(MANDATORY_21) == 21 and set(MANDATORY_21) <= set(header)
    for column in header:
        assert column in SPEC or CUSTOM.match(column), f"{column} is neither a FOCUS column nor x_-prefixed"
    for row in rows:
        for column, (_level, dtype, nullable, allowed) in SPEC.items():
            value = row[column]
            if value == "":
                assert nullable, f"{column} is null"
                continue
            if dtype == "Decimal":
                assert DECIMAL.match(value), f"{column}={value!r} is not a decimal"
            elif dtype == "DateTime":
                assert DATETIME.match(value), f"{column}={value!r} is not a UTC date/time"
            elif dtype == "Currency":
                assert CURRENCY.match(value), f"{column}={value!r}"
            elif dtype == "KeyValue":
                tags = json.loads(value)
                assert isinstance(tags, dict) and all(isinstance(v, str) for v in tags.values())
            if allowed is not None:
                assert value in allowed, f"{column}={value!r} is not an allowed value"
        # cross-column rules
        assert row["ChargePeriodStart"] < row["ChargePeriodEnd"]
        assert row["BillingPeriodStart"] < row["BillingPeriodEnd"]
        if row["ChargeClass"] != "Correction":  # a correction may be of an earlier period
            assert row["BillingPeriodStart"] <= row["ChargePeriodStart"] < row["BillingPeriodEnd"]
        assert row["BilledCost"] == row["EffectiveCost"] == row["ListCost"] == row["ContractedCost"]  # no discounts
        for price, cost in (("ListUnitPrice", "ListCost"), ("ContractedUnitPrice", "ContractedCost")):
            expected = Decimal(row[price]) * Decimal(row["PricingQuantity"])
            assert abs(expected - Decimal(row[cost])) < Decimal("1e-9"), (price, cost, row)
        assert row["PricingUnit"] and UNIT.match(row["PricingUnit"]) and UNIT.match(row["ConsumedUnit"])
    return rows


# -- the ledger of a month ----------------------------------------------------------------------------------------------
async def _month(s) -> Clock:
    """web1 (team=web, node n1) runs 10:00-12:30 on 3 Nov (the stop reported late, after 12:00-13:00 closed: a
    correction); db1 (team=db) runs 10:00-11:00; a price for vCPUs only (memory and root disk stay unpriced)."""
    await set_price(s, VCPU, "0.004")
    clock = Clock(at(10))
    await put(s, instance("running", at(10), launched=at(10)))
    db = instance("running", at(10), launched=at(10), labels={"team": "db"})
    db.id, db.name = "i-db1", "db1"
    await put(s, db)
    clock.now = at(11, 10)
    await Meter(s, clock).run()
    db2 = instance("stopped", at(11, 20), launched=at(10), stopped=at(11), labels={"team": "db"})
    db2.id, db2.name = "i-db1", "db1"
    await put(s, db2)
    clock.now = at(13, 10)
    await Meter(s, clock).run()
    await put(s, instance("stopped", at(13, 20), launched=at(10), stopped=at(12, 30)))
    clock.now = _dt.datetime(2026, 12, 1, 0, 10, tzinfo=_dt.UTC)
    await Meter(s, clock).run()
    return clock


async def test_cost_report_groups_by_service_resource_label_and_node_with_a_forecast(store):  # noqa: F811
    clock = await _month(store)
    now = _dt.datetime(2026, 11, 16, tzinfo=_dt.UTC)  # half-way through November
    r = await costs.cost_report(store, ["default"], since="30d", group_by="label:team", granularity="day", now=now)
    # web1: 2.5 h x 2 vCPUs x 0.004 = 0.02 (3 h closed, then a -0.5 h correction); db1: 1 h x 2 x 0.004 = 0.008
    assert {(row.period, row.group): row.amount for row in r.rows} == {
        ("2026-11-03", "web"): "0.02", ("2026-11-03", "db"): "0.008",
    }  # fmt: skip
    assert r.totals == {"EUR": "0.028"} and r.unpriced > 0  # memory and root disk have no price
    by_resource = await costs.cost_report(store, ["default"], since="2026-11-01", group_by="resource",
                                          granularity="month", now=now)  # fmt: skip
    assert {row.group for row in by_resource.rows} == {"instance/web1", "instance/db1"}
    assert {row.period for row in by_resource.rows} == {"2026-11"}
    by_node = await costs.cost_report(store, ["default"], since="30d", group_by="node", granularity="day", now=now)
    assert [row.group for row in by_node.rows] == ["n1"]
    by_service = await costs.cost_report(store, ["default"], since="30d", group_by="service", granularity="day",
                                         now=now)  # fmt: skip
    assert [(row.group, row.amount) for row in by_service.rows] == [("compute", "0.028")]
    # forecast: closed up to 1 Dec 00:00 when asked on 16 Nov -> the month is complete, forecast = actual
    assert r.forecast.period == "2026-11" and r.forecast.actual == {"EUR": "0.028"}
    assert r.forecast.forecast == {"EUR": "0.03"}
    # pure: half the month closed -> twice the actual
    charges = await costs.load_charges(store, ["default"])
    half = costs.forecast(charges, closed_until=int(now.timestamp()), now=int(now.timestamp()))
    assert half.actual == {"EUR": "0.028"} and half.forecast == {"EUR": "0.06"}  # 0.056 rounded to cents
    # nothing before since
    later = await costs.cost_report(store, ["default"], since="1d", group_by="service", granularity="day", now=now)
    assert later.rows == [] and later.totals == {}
    for bad in ({"since": "30x"}, {"group_by": "colour"}, {"since": "2020-01-01"}):
        args = {"since": "30d", "group_by": "service", **bad}
        with pytest.raises(errors.ValidationFailed):
            await costs.cost_report(store, ["default"], granularity="day", now=clock.now, **args)


async def test_focus_export_has_every_mandatory_column_with_the_specs_types_and_values(store, monkeypatch):  # noqa: F811
    clock = await _month(store)
    text = await costs.focus_export(store, ["default"], "2026-11", currency="EUR")
    rows = check_focus(text)
    monkeypatch.setattr(costs, "CHUNK_ROWS", 2)  # streamed in chunks of two rows: the same file
    chunks = [c async for c in costs.focus_chunks(store, ["default"], "2026-11", currency="EUR")]
    assert len(chunks) > 3 and "".join(chunks) == text
    open_invoice, _ = await invoices.show(store, "default", "2026-11")
    assert len(rows) == sum(1 for _ in rows) and rows
    assert sum(Decimal(r["BilledCost"]) for r in rows) == Decimal(open_invoice.totals["EUR"])
    corrections = [r for r in rows if r["ChargeClass"] == "Correction"]
    assert {r["SkuId"] for r in corrections} == {VCPU, "compute.memory-gib-hour"}  # memory unpriced: 0
    assert sum(Decimal(r["BilledCost"]) for r in corrections) == Decimal("-0.004")
    web = [r for r in rows if r["ResourceName"] == "web1" and r["SkuId"] == VCPU]
    assert {r["Tags"] for r in web} == {'{"team":"web"}'} and {r["PricingUnit"] for r in web} == {"vCPU-Hours"}
    assert {r["ServiceCategory"] for r in rows} == {"Compute", "Storage"}  # root disks are storage
    assert all(r["InvoiceId"] == "" for r in rows)  # not closed yet
    zoned = costs.focus_rows("default", "2026-11", [json.loads(json.dumps(c)) for c in
                             (await costs.invoice_charges(store, "default", "2026-11"))[0][:1]],
                             currency="EUR", invoice_id=None, zones={"n1": "rack-a"})  # fmt: skip
    assert zoned[0]["AvailabilityZone"] == "rack-a" and rows[0]["AvailabilityZone"] == ""  # no node has a zone here
    # once closed, the export names the invoice and holds the same charges
    await invoices.close_invoice(Context.system("t"), store, "2026-11", clock.now)
    closed = check_focus(await costs.focus_export(store, ["default"], "2026-11", currency="EUR"))
    assert len({r["InvoiceId"] for r in closed}) == 1 and closed[0]["InvoiceId"].startswith("inv-")
    assert [r["x_LedgerSeq"] for r in closed] == [r["x_LedgerSeq"] for r in rows]
    # a month without charges is a header alone
    empty = await costs.focus_export(store, ["default"], "2026-10", currency="EUR")
    assert empty.count("\n") == 1 and check_focus(empty) == []


async def test_a_report_reads_its_hours_through_the_index_with_the_full_scans_figures(store):  # noqa: F811
    await _month(store)
    everything = await costs.load_charges(store, ["default"])
    nov3 = int(_dt.datetime(2026, 11, 3, tzinfo=_dt.UTC).timestamp())
    for since, until in (
        (nov3 + 11 * 3600, nov3 + 12 * 3600),
        (nov3, nov3 + 86400),
        (0, 2**40),
        (nov3 + 14 * 3600, 2**40),
    ):
        ranged = await costs.load_charges(store, ["default"], since=since, until=until)
        expected = [c for c in everything if since <= int(_dt.datetime.fromisoformat(c["hour"]).timestamp()) < until]
        assert sorted(ranged, key=lambda c: c["seq"]) == expected
    assert {c["hour"] for c in await costs.load_charges(store, ["default"], since=nov3 + 11 * 3600,
                                                        until=nov3 + 12 * 3600)} == {"2026-11-03T11:00:00Z"}  # fmt: skip
    # cost_report (the range and the month so far) gives what the report over every charge gives
    for now, since in (
        (_dt.datetime(2026, 11, 16, tzinfo=_dt.UTC), "30d"),
        (_dt.datetime(2026, 11, 3, 12, 30, tzinfo=_dt.UTC), "1h"),
        (_dt.datetime(2026, 12, 1, 0, 10, tzinfo=_dt.UTC), "2026-11-03"),
        (_dt.datetime(2026, 12, 5, tzinfo=_dt.UTC), "5d"),
    ):
        now_s = int(now.timestamp())
        r = await costs.cost_report(store, ["default"], since=since, group_by="resource", granularity="day", now=now)
        start = costs.parse_since(since, now_s)
        rows, totals, unpriced = costs.report(everything, projects=["default"], since=start, until=now_s + 3600,
                                              group_by="resource", granularity="day")  # fmt: skip
        closed = await costs.closed_until(store)
        assert (r.rows, r.totals, r.unpriced) == (rows, totals, unpriced), since
        assert r.forecast == costs.forecast(everything, closed_until=closed, now=now_s), since
