"""``minicloud audit list``: the append-only audit log."""

from __future__ import annotations

import argparse

from minicloud.cli.common import client
from minicloud.cli.output import col, emit
from minicloud.model import AuditEntry

COLUMNS = [
    col("time", "time"),
    col("principal", "principal"),
    col("project", "project"),
    col("action", "action"),
    col("result", "result"),
    col("status", "status"),
    col("target", "target.name"),
    col("source", "source"),
    col("count", "count"),
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="the audit log: every change and every denied request")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("list", help="list audit entries, oldest first")
    v.add_argument("--since", help="an RFC 3339 time, or a duration back from now: 90s, 15m, 2h, 7d")
    v.add_argument("--user", help="only this principal (e.g. local:root, user:alice, serviceaccount:ci)")
    v.add_argument("--result", choices=["allowed", "denied", "failed"])
    v.add_argument("--in-project", help="only entries of this project")
    v.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
    v.set_defaults(func=list_)


def list_(args: argparse.Namespace) -> int:
    query = {"since": args.since, "user": args.user, "result": args.result, "in_project": args.in_project}
    entries = []
    for entry in client(args).paginate("/v1/audit", AuditEntry, **query):
        entries.append(entry)
        if len(entries) >= args.limit:
            break
    emit(entries, args.output, COLUMNS)
    return 0
