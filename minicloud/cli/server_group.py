"""``minicloud server-group create|list|show|delete``: instances the scheduler keeps apart or together."""

from __future__ import annotations

import argparse

from minicloud.cli import generic
from minicloud.cli.common import client
from minicloud.cli.keypair import parse_labels
from minicloud.cli.output import emit
from minicloud.compute.kinds import SERVERGROUP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("server-group", help="instances kept apart (anti-affinity) or together (affinity)")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("create", help="create a server group; give it to `instance create --server-group`")
    v.add_argument("name")
    v.add_argument(
        "--policy",
        required=True,
        choices=["anti-affinity", "affinity", "soft-anti-affinity"],
        help="anti-affinity: never two members on one node (or zone), a create that cannot honour it fails; "
        "affinity: all on one node (or zone); soft-anti-affinity: apart when possible",
    )
    v.add_argument(
        "--scope", choices=["node", "zone"], default="node", help="apart/together per node (default) or zone"
    )
    v.add_argument("--description", default="")
    v.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    v.set_defaults(func=create)
    generic.add_verbs(verbs, SERVERGROUP, lambda c: c.server_groups)


def create(args: argparse.Namespace) -> int:
    group = client(args).server_groups.create(
        name=args.name,
        policy=args.policy,
        scope=args.scope,
        description=args.description,
        labels=parse_labels(args.label),
    )
    emit(group, args.output)
    return 0
