"""``minicloud security-group create|list|show|delete`` and ``security-group rule add|remove``: stateful firewalls
for NICs."""

from __future__ import annotations

import argparse

from minicloud.cli import generic
from minicloud.cli.common import CommandError, client
from minicloud.cli.keypair import parse_labels
from minicloud.cli.output import emit
from minicloud.network.kinds import SECURITY_GROUP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("security-group", help="security groups (stateful allow rules; everything else is dropped)")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("create", help="create a security group (all egress allowed)")
    v.add_argument("name")
    v.add_argument("--description", default="")
    v.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    v.add_argument("--no-egress", action="store_true", help="start with no rule at all (deny everything)")
    v.set_defaults(func=create)
    generic.add_verbs(verbs, SECURITY_GROUP, lambda c: c.security_groups)

    rule = verbs.add_parser("rule", help="add or remove rules")
    rverbs = rule.add_subparsers(dest="rule_verb", metavar="<verb>", required=True)
    r = rverbs.add_parser("add", help="allow traffic in one direction")
    r.add_argument("group")
    r.add_argument("direction", choices=("ingress", "egress"))
    r.add_argument("--protocol", choices=("tcp", "udp", "icmp", "any"), default="any")
    r.add_argument("--port", metavar="PORT[-PORT]", help="tcp/udp: a port or a range (default: all)")
    remote = r.add_mutually_exclusive_group()
    remote.add_argument("--remote-cidr", metavar="CIDR", help="the other end's addresses (default: 0.0.0.0/0)")
    remote.add_argument("--remote-group", metavar="GROUP", help="members of this group (same project)")
    r.add_argument("--description", default="")
    r.set_defaults(func=add_rule)
    r = rverbs.add_parser("remove", help="remove a rule by its id (see `security-group show`)")
    r.add_argument("group")
    r.add_argument("rule_id")
    r.set_defaults(func=remove_rule)


def create(args: argparse.Namespace) -> int:
    fields = {"description": args.description, "labels": parse_labels(args.label)}
    if args.no_egress:
        fields["rules"] = []
    emit(client(args).security_groups.create(name=args.name, **fields), args.output)
    return 0


def parse_port(text: str | None) -> tuple[int | None, int | None]:
    if text is None:
        return None, None
    lo, sep, hi = text.partition("-")
    try:
        return int(lo), int(hi) if sep else None
    except ValueError:
        raise CommandError(f"--port {text!r} must be PORT or PORT-PORT, e.g. 22 or 8000-8080") from None


def add_rule(args: argparse.Namespace) -> int:
    port_min, port_max = parse_port(args.port)
    group = client(args).security_groups.add_rule(
        args.group,
        direction=args.direction,
        protocol=args.protocol,
        port_min=port_min,
        port_max=port_max,
        remote_cidr=args.remote_cidr,
        remote_group=args.remote_group,
        description=args.description or None,
    )
    emit(group, args.output)
    return 0


def remove_rule(args: argparse.Namespace) -> int:
    emit(client(args).security_groups.remove_rule(args.group, args.rule_id), args.output)
    return 0
