"""``minicloud <noun> list|show|delete`` derived from a kind's declaration (its noun, title and list columns)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import Any

from minicloud.cli.common import client
from minicloud.cli.output import col, emit
from minicloud.client import Client
from minicloud.client.collection import Collection
from minicloud.core.kinds import Kind


def add_verbs(
    verbs: argparse._SubParsersAction,
    kind: Kind[Any, Any],
    collection: Callable[[Client], Collection[Any]],
    which: Iterable[str] = ("list", "show", "delete"),
) -> None:
    """Add the generic verbs ``which`` for ``kind`` to a noun's sub-parsers; ``collection`` picks the SDK's."""
    title = kind.label
    a = "an" if title[:1] in "aeiou" else "a"
    columns = [col(c.header, c.path) for c in kind.columns]
    for verb in which:
        if verb == "list":
            v = verbs.add_parser("list", help=f"list {title}s")
            v.add_argument("--label", metavar="KEY=VALUE[,...]", help="only those with these labels")
            v.add_argument("--name", help="only the one with this name")

            def list_(args: argparse.Namespace) -> int:
                items = collection(client(args)).list(label=args.label, name=args.name)
                emit(items, args.output, columns)
                return 0

            v.set_defaults(func=list_)
        elif verb == "show":
            v = verbs.add_parser("show", help=f"show {a} {title} (by name or id)")
            v.add_argument("name")

            def show(args: argparse.Namespace) -> int:
                emit(collection(client(args)).get(args.name), args.output)
                return 0

            v.set_defaults(func=show)
        elif verb == "delete":
            v = verbs.add_parser("delete", help=f"delete {a} {title}")
            v.add_argument("name")

            def delete(args: argparse.Namespace) -> int:
                collection(client(args)).delete(args.name)
                if args.output == "table":
                    print(f"Deleted {title} {args.name}")
                return 0

            v.set_defaults(func=delete)
        else:
            raise ValueError(f"no generic verb {verb!r}")
