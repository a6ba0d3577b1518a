"""Issue #14's command lines run exactly as the issue writes them, through the real CLI parser, the SDK and the API
on a Unix socket: the cost and policy lines on an empty ledger (each is accepted and answers in its documented shape);
``price set``, ``billing verify`` and ``invoice list|show|close`` on a ledger metered from a known month of usage
(what they print and their exit status, ``verify`` also after an entry was edited in the SQLite database)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import io
import json
import shlex
import sqlite3
from decimal import Decimal

import msgspec
from aiohttp import web

from minicloud.api.app import create_app
from minicloud.api.keys import STORE
from minicloud.billing import invoices, ledger
from minicloud.cli.main import main
from tests.unit.api.conftest import make_config
from tests.unit.billing.test_metering import Clock, Meter, at, running_instance_scenario


async def test_the_issue_lines_run_through_the_real_cli(tmp_path):
    runner = web.AppRunner(create_app(make_config(tmp_path)))
    await runner.setup()
    sock = str(tmp_path / "api.sock")
    await web.UnixSite(runner, sock).start()

    def run(line: str) -> tuple[int, str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["--socket", sock, *shlex.split(line)[1:]])
        return code, out.getvalue()

    try:
        report = await asyncio.to_thread(run, "minicloud cost report --group-by service --since 30d --granularity day")
        focus = await asyncio.to_thread(run, "minicloud cost export --format focus --period 2026-11")
        recs = await asyncio.to_thread(run, "minicloud cost recommendations")
        policy = await asyncio.to_thread(run, "minicloud policy create auto-stop --selector label:env=dev --idle 2h")
        shown = await asyncio.to_thread(run, "minicloud -o json policy list")
    finally:
        await runner.cleanup()
    assert report[0] == 0, report
    assert focus[0] == 0, focus
    header = focus[1].splitlines()[0].split(",")
    assert {"BilledCost", "BillingPeriodStart", "ChargeCategory", "ServiceName"} <= set(header), header
    assert recs[0] == 0, recs
    assert policy[0] == 0, policy
    [made] = json.loads(shown[1])
    assert (made["type"], made["selector"], made["idle"], made["dry_run"]) == ("auto-stop", {"env": "dev"}, 7200, False)


# -- prices, the ledger and invoices: the lines run against a ledger metered from a known month of usage ---------------
NOVEMBER = "2026-11"


def _config(tmp_path):
    """The API's config with the billing loops off (the test meters with its own clock, as test_metering does) and
    a default currency other than EUR, so that ``--currency EUR`` is seen to reach the service."""
    cfg = make_config(tmp_path)
    return msgspec.structs.replace(cfg, billing=msgspec.structs.replace(cfg.billing, enabled=False, currency="USD"))


@contextlib.asynccontextmanager
async def _serve(config, sock: str):
    runner = web.AppRunner(create_app(config))
    await runner.setup()
    await web.UnixSite(runner, sock).start()
    try:
        yield runner.app
    finally:
        await runner.cleanup()


async def _cli(sock: str, line: str) -> tuple[int, str, str]:
    """``line`` as typed (``minicloud ...``) through the real CLI: (exit status, stdout, stderr)."""

    def run() -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["--socket", sock, *shlex.split(line)[1:]])
        return code, out.getvalue(), err.getvalue()

    return await asyncio.to_thread(run)


async def _priced_november(sock: str, store, monkeypatch) -> Clock:
    """The issue's price line on 1 November 00:30 (in force from 01:00), then web1 runs 2.5 h on 3 November and the
    meter closes November; the API's clock is then 1 December 00:10."""
    clock = Clock(_dt.datetime(2026, 11, 1, 0, 30, tzinfo=_dt.UTC))
    monkeypatch.setattr(invoices, "now_utc", clock)
    code, out, err = await _cli(sock, "minicloud price set compute.vcpu-hour 0.004 --currency EUR")
    assert code == 0, (out, err)
    clock.now = at(10)
    await running_instance_scenario(store, clock)
    clock.now = _dt.datetime(2026, 12, 1, 0, 10, tzinfo=_dt.UTC)  # past November's end + close_delay
    await Meter(store, clock).run()
    return clock


def _charges(chain) -> list[dict]:
    return [json.loads(e.spec.charge) for e in chain]


async def test_the_price_set_line_adds_a_version_in_its_currency_that_charges_use(tmp_path, monkeypatch):
    sock = str(tmp_path / "api.sock")
    async with _serve(_config(tmp_path), sock) as app:
        await _priced_november(sock, app[STORE], monkeypatch)
        code, out, err = await _cli(sock, "minicloud -o json price list --meter compute.vcpu-hour")
        chain = await ledger.entries(app[STORE], "default")
    assert code == 0, (out, err)
    [price] = json.loads(out)
    # the amount and currency of the line (not billing.currency, USD here), in force from the next full hour
    assert (price["meter"], price["amount"], price["currency"]) == ("compute.vcpu-hour", "0.004", "EUR"), price
    assert price["effective"] == "2026-11-01T01:00:00Z" and price["until"] is None, price
    vcpu = [c for c in _charges(chain) if c["meter"] == "compute.vcpu-hour"]
    assert vcpu and {(c["price"], c["currency"], c["price_id"]) for c in vcpu} == {("0.004", "EUR", price["id"])}


async def test_billing_verify_passes_then_names_the_entry_edited_in_the_database(tmp_path, monkeypatch):
    sock = str(tmp_path / "api.sock")
    config = _config(tmp_path)
    async with _serve(config, sock) as app:
        await _priced_november(sock, app[STORE], monkeypatch)
        untouched = await _cli(sock, "minicloud billing verify")
        chain = await ledger.entries(app[STORE], "default")
    assert untouched[0] == 0, untouched
    [header, row] = untouched[1].splitlines()
    assert header.split()[:3] == ["PROJECT", "ENTRIES", "OK"] and row.split()[:3] == [
        "default",
        str(len(chain)),
        "True",
    ]
    assert untouched[2] == ""
    # one entry in the middle of the chain (a priced charge) edited in the SQLite database while the API is down
    victim = next(e for e in chain[1:-1] if json.loads(e.spec.charge)["price"] is not None)
    db = sqlite3.connect(config.data_path / "state.db")
    spec = json.loads(db.execute("SELECT spec FROM records WHERE id = ?", (victim.id,)).fetchone()[0])
    assert '"amount":"0.' in spec["charge"]
    spec["charge"] = spec["charge"].replace('"amount":"0.', '"amount":"1.', 1)
    assert db.execute("UPDATE records SET spec = ? WHERE id = ?", (json.dumps(spec), victim.id)).rowcount == 1
    db.commit()
    db.close()
    async with _serve(config, sock):
        altered = await _cli(sock, "minicloud billing verify")
        as_json = await _cli(sock, "minicloud -o json billing verify")
    assert altered[0] == 1, altered
    [row] = altered[1].splitlines()[1:]
    assert row.split()[:5] == ["default", str(len(chain)), "False", str(victim.spec.seq), victim.id], altered
    assert "altered" in altered[1].split(victim.id, 1)[1], altered  # the why column
    assert "the ledger was altered" in altered[2], altered
    assert as_json[0] == 1, as_json
    [project] = json.loads(as_json[1])["projects"]
    assert (project["ok"], project["first_bad_seq"], project["first_bad_id"]) == (False, victim.spec.seq, victim.id)


async def test_invoice_list_show_and_close_lines(tmp_path, monkeypatch):
    sock = str(tmp_path / "api.sock")
    async with _serve(_config(tmp_path), sock) as app:
        await _priced_november(sock, app[STORE], monkeypatch)
        chain = await ledger.entries(app[STORE], "default")
        listed_open = await _cli(sock, "minicloud -o json invoice list")
        shown_open = await _cli(sock, "minicloud invoice show 2026-11")
        open_json = await _cli(sock, "minicloud -o json invoice show 2026-11")
        closed = await _cli(sock, "minicloud invoice close 2026-11")
        again = await _cli(sock, "minicloud invoice close 2026-11")
        listed = await _cli(sock, "minicloud invoice list")
        shown = await _cli(sock, "minicloud invoice show 2026-11")
        closed_json = await _cli(sock, "minicloud -o json invoice show 2026-11")
    for result in (listed_open, shown_open, open_json, closed, listed, shown, closed_json):
        assert result[0] == 0, result
    # before the close only the current month (December, the API's clock) is listed, open
    assert [(i["period"], i["state"]) for i in json.loads(listed_open[1])] == [("2026-12", "open")], listed_open
    # November as it stands: every charge of the ledger, totalled exactly, the vCPU line at the price set above
    doc = json.loads(open_json[1])
    assert (doc["state"], doc["through_seq"]) == ("open", chain[-1].spec.seq)
    charged: dict[str, Decimal] = {}
    for c in _charges(chain):
        if c["currency"] is not None:
            charged[c["currency"]] = charged.get(c["currency"], Decimal(0)) + Decimal(c["amount"])
    assert {k: Decimal(v) for k, v in doc["totals"].items()} == charged and set(charged) == {"EUR"}, doc["totals"]
    assert sum(Decimal(line["amount"]) for line in doc["lines"]) == sum(charged.values())
    first = shown_open[1].splitlines()
    assert first[0] == f"invoice default {NOVEMBER} (open), sha256 {doc['sha256']}", first
    vcpu = [line.split() for line in first if line.startswith("compute.vcpu-hour")]
    assert vcpu and all((row[-4], row[-3]) == ("0.004", "EUR") for row in vcpu), first
    assert first[-1] == "totals: " + ", ".join(f"{v} {k}" for k, v in doc["totals"].items()), first
    # close stores exactly the document shown open; it is then listed and shown as closed with that sha256
    assert dict(line.split(": ", 1) for line in closed[1].splitlines())["sha256"].strip() == doc["sha256"], closed
    assert again[0] == 1 and "already closed" in again[2], again
    rows = [line.split() for line in listed[1].splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [(NOVEMBER, "closed"), ("2026-12", "open")], listed
    assert rows[0][2] == "EUR=" + doc["totals"]["EUR"] and rows[0][-1] == doc["sha256"], listed
    assert rows[1][2] == "-", listed  # November's charges are on November's invoice now, not on December's
    assert shown[1].splitlines()[0] == f"invoice default {NOVEMBER} (closed), sha256 {doc['sha256']}", shown
    assert shown[1].splitlines()[1:] == first[1:], shown
    stored = json.loads(closed_json[1])
    assert stored["state"] == "closed" and stored["closed_at"] and stored["document"] == doc["document"], stored
