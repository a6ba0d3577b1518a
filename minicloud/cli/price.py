"""``minicloud price set|list``: the price catalogue (versions per meter with effective dates; docs/billing.md)."""

from __future__ import annotations

import argparse

from minicloud.cli.common import client
from minicloud.cli.output import col, emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("price", help="meter prices: versions with effective dates (admins set them)")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("set", help="add a version of a meter's price, per hour of its pricing unit")
    v.add_argument("meter", help="e.g. compute.vcpu-hour (see `minicloud price meters`)")
    v.add_argument("amount", help="a decimal, e.g. 0.004")
    v.add_argument("--currency", help="ISO 4217 (default: billing.currency)")
    v.add_argument("--effective", metavar="DATE", help="YYYY-MM-DD or YYYY-MM-DDTHH:00:00Z (default: the next hour)")
    v.add_argument("--until", metavar="DATE", help="an explicit end (default: until the next version)")
    v.add_argument("--description", default="")
    v.set_defaults(func=set_price)
    v = verbs.add_parser("list", help="every price version")
    v.add_argument("--meter", help="only this meter's versions")
    v.set_defaults(func=list_prices)
    v = verbs.add_parser("meters", help="the meters and their units")
    v.set_defaults(func=meters)


def set_price(args: argparse.Namespace) -> int:
    price = client(args).billing.set_price(
        args.meter, args.amount, currency=args.currency, effective=args.effective, until=args.until,
        description=args.description,
    )  # fmt: skip
    emit(price, args.output)
    return 0


def list_prices(args: argparse.Namespace) -> int:
    columns = [col("meter", "meter"), col("amount", "amount"), col("currency", "currency"),
               col("per", "pricing_unit"), col("effective", "effective"), col("until", "until")]  # fmt: skip
    emit(client(args).billing.prices(args.meter), args.output, columns)
    return 0


def meters(args: argparse.Namespace) -> int:
    columns = [col("meter", "name"), col("service", "service"), col("unit", "unit"), col("priced per", "pricing_unit"),
               col("what", "description")]  # fmt: skip
    emit(client(args).billing.meters(), args.output, columns)
    return 0
