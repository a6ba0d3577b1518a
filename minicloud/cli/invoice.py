"""``minicloud invoice list|show|close|export``: monthly invoices rendered from the ledger (docs/billing.md)."""

from __future__ import annotations

import argparse
import json

from minicloud.cli.common import client
from minicloud.cli.output import col, emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("invoice", help="monthly invoices of the project")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("list", help="closed invoices and the current month's open one")
    v.set_defaults(func=list_invoices)
    v = verbs.add_parser("show", help="one month's invoice (closed: as stored; open: as it stands)")
    v.add_argument("period", help="YYYY-MM")
    v.set_defaults(func=show)
    v = verbs.add_parser("close", help="close a past month's invoice for good (admins)")
    v.add_argument("period", help="YYYY-MM")
    v.set_defaults(func=close)
    v = verbs.add_parser("export", help="print the invoice as CSV or as its canonical JSON document")
    v.add_argument("period", help="YYYY-MM")
    v.add_argument("--format", choices=["csv", "json"], default="csv")
    v.set_defaults(func=export)


_LINES = [col("meter", "meter"), col("resource", "resource_name"), col("quantity", "quantity"), col("unit", "unit"),
          col("price", "price"), col("currency", "currency"), col("amount", "amount"), col("earlier", "earlier")]  # fmt: skip


def list_invoices(args: argparse.Namespace) -> int:
    columns = [col("period", "period"), col("state", "state"), col("totals", "totals"), col("sha256", "sha256")]
    emit(client(args).billing.invoices(), args.output, columns)
    return 0


def show(args: argparse.Namespace) -> int:
    invoice = client(args).billing.invoice(args.period)
    if args.output != "table":
        emit(invoice, args.output)
        return 0
    print(f"invoice {invoice.project} {invoice.period} ({invoice.state}), sha256 {invoice.sha256}")
    emit(invoice.lines, "table", _LINES)
    print("totals: " + (", ".join(f"{v} {k}" for k, v in invoice.totals.items()) or "nothing charged"))
    return 0


def close(args: argparse.Namespace) -> int:
    invoice = client(args).billing.close_invoice(args.period)
    emit(invoice if args.output != "table" else {"period": invoice.period, "sha256": invoice.sha256,
                                                  "totals": invoice.totals}, args.output)  # fmt: skip
    return 0


def export(args: argparse.Namespace) -> int:
    c = client(args)
    if args.format == "csv":
        print(c.billing.invoice_csv(args.period), end="")
    else:
        print(json.dumps(c.billing.invoice(args.period).document, sort_keys=True, separators=(",", ":")))
    return 0
