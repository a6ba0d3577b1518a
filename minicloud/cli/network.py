"""``minicloud network create|list|show|delete``: VPC networks, and external networks for administrators."""

from __future__ import annotations

import argparse

from minicloud.cli import generic
from minicloud.cli.common import client
from minicloud.cli.keypair import parse_labels
from minicloud.cli.output import emit
from minicloud.network.kinds import NETWORK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("network", help="private networks (VPCs) and external networks")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("create", help="create a VPC (or, as an administrator, an external network)")
    v.add_argument("name")
    v.add_argument("--cidr", required=True, help="its IPv4 range, e.g. 10.0.0.0/16")
    v.add_argument("--description", default="")
    v.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    v.add_argument("--external", action="store_true", help="an external (public) network on a host interface")
    v.add_argument("--provider", metavar="PHYSNET", help="external: the [network.providers] key of the nodes")
    v.add_argument("--gateway", metavar="ADDRESS", help="external: the upstream router (default: first address)")
    v.add_argument("--pool", metavar="FIRST-LAST", help="external: the addresses routers and floating IPs take")
    v.set_defaults(func=create)
    generic.add_verbs(verbs, NETWORK, lambda c: c.networks)


def create(args: argparse.Namespace) -> int:
    fields = {"description": args.description, "labels": parse_labels(args.label)}
    if args.external:
        fields.update(external=True, provider=args.provider, gateway=args.gateway, pool=args.pool)
    emit(client(args).networks.create(name=args.name, cidr=args.cidr, **fields), args.output)
    return 0
