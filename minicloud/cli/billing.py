"""``minicloud billing verify``: recompute the ledger's hash chain and name the first altered entry."""

from __future__ import annotations

import argparse
import sys

from minicloud.cli.common import client
from minicloud.cli.output import col, emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("billing", help="the billing ledger")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("verify", help="check the project's hash-chained ledger (exit 1 when it was altered)")
    v.add_argument("--all", action="store_true", help="every project's ledger (admins)")
    v.set_defaults(func=verify)


def verify(args: argparse.Namespace) -> int:
    result = client(args).billing.verify(all_projects=args.all)
    columns = [col("project", "project"), col("entries", "entries"), col("ok", "ok"),
               col("first bad seq", "first_bad_seq"), col("entry", "first_bad_id"), col("why", "reason")]  # fmt: skip
    emit(result.projects if args.output == "table" else result, args.output, columns)
    if not result.ok:
        print("the ledger was altered: see the first bad entry above", file=sys.stderr)
        return 1
    return 0
