"""``minicloud snapshot create|list|show|revert|delete``: point-in-time copies of a volume or of an instance's root
disk."""

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
    v = verbs.add_parser("create", help="snapshot a volume, or an instance's root disk")
    v.add_argument("name")
    of = v.add_mutually_exclusive_group(required=True)
    of.add_argument("--volume", help="the volume to snapshot")
    of.add_argument("--instance", help="the instance whose root disk to snapshot (a root disk in a ceph pool)")
    v.add_argument("--description", default="")
    v.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    v.set_defaults(func=create)
    generic.add_verbs(verbs, SNAPSHOT, lambda c: c.snapshots)
    v = verbs.add_parser(
        "revert",
        help="put the snapshot's volume (detached, or its instance stopped) or root disk (instance stopped) back to it",
    )
    v.add_argument("name")
    v.set_defaults(func=revert)


def create(args: argparse.Namespace) -> int:
    of = {"volume": args.volume} if args.volume is not None else {"instance": args.instance}
    snap = client(args).snapshots.create(
        name=args.name, description=args.description, labels=parse_labels(args.label), **of
    )
    emit(snap, args.output)
    return 0


def revert(args: argparse.Namespace) -> int:
    emit(client(args).snapshots.revert(args.name), args.output)
    return 0
