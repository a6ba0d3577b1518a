"""``minicloud router create|list|show|delete|add-subnet|remove-subnet`` and ``router route add|remove``."""

from __future__ import annotations

import argparse

from minicloud.cli import generic
from minicloud.cli.common import client
from minicloud.cli.keypair import parse_labels
from minicloud.cli.output import emit
from minicloud.network.kinds import ROUTER


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("router", help="routers between subnets, with SNAT to an external network")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("create", help="create a router")
    v.add_argument("name")
    v.add_argument("--external-network", metavar="NETWORK", help="an external network for SNAT (name or id)")
    v.add_argument("--description", default="")
    v.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    v.set_defaults(func=create)
    generic.add_verbs(verbs, ROUTER, lambda c: c.routers)
    for verb, help_ in (("add-subnet", "attach a subnet"), ("remove-subnet", "detach a subnet")):
        v = verbs.add_parser(verb, help=help_)
        v.add_argument("router")
        v.add_argument("subnet")
        v.set_defaults(func=subnet_verb, method=verb.replace("-", "_"))
    route = verbs.add_parser("route", help="static routes")
    rverbs = route.add_subparsers(dest="route_verb", metavar="<verb>", required=True)
    for verb, help_ in (("add", "add a static route"), ("remove", "remove a static route")):
        v = rverbs.add_parser(verb, help=help_)
        v.add_argument("router")
        v.add_argument("destination", help="a CIDR, e.g. 10.9.0.0/16")
        v.add_argument("nexthop", help="an address in one of the router's subnets")
        v.set_defaults(func=route_verb, method=f"{verb}_route")


def create(args: argparse.Namespace) -> int:
    router = client(args).routers.create(
        name=args.name,
        external_network=args.external_network,
        description=args.description,
        labels=parse_labels(args.label),
    )
    emit(router, args.output)
    return 0


def subnet_verb(args: argparse.Namespace) -> int:
    emit(getattr(client(args).routers, args.method)(args.router, args.subnet), args.output)
    return 0


def route_verb(args: argparse.Namespace) -> int:
    emit(getattr(client(args).routers, args.method)(args.router, args.destination, args.nexthop), args.output)
    return 0
