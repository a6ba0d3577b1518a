"""``minicloud operation list|show|wait|delete``: long-running work."""

from __future__ import annotations

import argparse

from minicloud.cli.common import client, wait_operation
from minicloud.cli.output import col, emit

COLUMNS = [
    col("id", "id"),
    col("action", "action"),
    col("state", "state"),
    col("progress", "progress.message"),
    col("node", "node"),
    col("created", "created_at"),
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("operation", help="long-running operations")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("list", help="list operations")
    v.add_argument("--state", choices=["running", "succeeded", "failed"])
    v.set_defaults(func=list_)
    v = verbs.add_parser("show", help="show an operation")
    v.add_argument("id")
    v.set_defaults(func=show)
    v = verbs.add_parser("wait", help="wait for an operation to finish, showing progress")
    v.add_argument("id")
    v.set_defaults(func=wait)
    v = verbs.add_parser("delete", help="forget a finished operation")
    v.add_argument("id")
    v.set_defaults(func=delete)


def list_(args: argparse.Namespace) -> int:
    emit(client(args).operations.list(state=args.state), args.output, COLUMNS)
    return 0


def show(args: argparse.Namespace) -> int:
    emit(client(args).operations.get(args.id), args.output)
    return 0


def wait(args: argparse.Namespace) -> int:
    c = client(args)
    emit(wait_operation(c, c.operations.get(args.id), args.output), args.output)
    return 0


def delete(args: argparse.Namespace) -> int:
    client(args).operations.delete(args.id)
    if args.output == "table":
        print(f"Deleted operation {args.id}")
    return 0
