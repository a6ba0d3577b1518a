"""``minicloud snapshot create|list|show|revert|delete``: point-in-time copies of a volume."""

from __future__ import annotations

import argparse

from minicloud.cli import generic
from minicloud.cli.common import client
from minicloud.cli.keypair import parse_labels
from minicloud.cli.output import emit
from minicloud.storage.kinds import SNAPSHOT


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("snapshot", help="volume snapshots")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("create", help="snapshot a volume")
    v.add_argument("name")
    v.add_argument("--volume", required=True)
    v.add_argument("--description", default="")
    v.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    v.set_defaults(func=create)
    generic.add_verbs(verbs, SNAPSHOT, lambda c: c.snapshots)
    v = verbs.add_parser("revert", help="put the snapshot's volume back to it (detached, or its instance stopped)")
    v.add_argument("name")
    v.set_defaults(func=revert)


def create(args: argparse.Namespace) -> int:
    snap = client(args).snapshots.create(
        name=args.name, volume=args.volume, description=args.description, labels=parse_labels(args.label)
    )
    emit(snap, args.output)
    return 0


def revert(args: argparse.Namespace) -> int:
    emit(client(args).snapshots.revert(args.name), args.output)
    return 0
