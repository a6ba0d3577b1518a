"""``minicloud subnet create|list|show|delete``: address ranges inside a network."""

from __future__ import annotations

import argparse

from minicloud.cli import generic
from minicloud.cli.common import CommandError, client
from minicloud.cli.keypair import parse_labels
from minicloud.cli.output import emit
from minicloud.network.kinds import SUBNET


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("subnet", help="subnets of networks (gateway, allocation range, DNS, routes)")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("create", help="create a subnet inside a network")
    v.add_argument("name")
    v.add_argument("--network", required=True, help="the network (name or id)")
    v.add_argument("--cidr", required=True, help="inside the network's, e.g. 10.0.1.0/24")
    v.add_argument("--gateway", metavar="ADDRESS", help="default: the first address")
    v.add_argument("--allocation-start", metavar="ADDRESS")
    v.add_argument("--allocation-end", metavar="ADDRESS")
    v.add_argument("--dns-server", action="append", default=[], metavar="ADDRESS")
    v.add_argument("--route", action="append", default=[], metavar="DESTINATION=NEXTHOP", help="a static route")
    v.add_argument("--description", default="")
    v.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    v.set_defaults(func=create)
    generic.add_verbs(verbs, SUBNET, lambda c: c.subnets)


def parse_routes(items: list[str]) -> list[dict[str, str]]:
    routes = []
    for item in items:
        dest, sep, hop = item.partition("=")
        if not sep:
            raise CommandError(f"--route {item!r} must be DESTINATION=NEXTHOP, e.g. 10.9.0.0/16=10.0.1.254")
        routes.append({"destination": dest, "nexthop": hop})
    return routes


def create(args: argparse.Namespace) -> int:
    subnet = client(args).subnets.create(
        name=args.name,
        network=args.network,
        cidr=args.cidr,
        gateway=args.gateway,
        allocation_start=args.allocation_start,
        allocation_end=args.allocation_end,
        dns_servers=args.dns_server,
        routes=parse_routes(args.route),
        description=args.description,
        labels=parse_labels(args.label),
    )
    emit(subnet, args.output)
    return 0
