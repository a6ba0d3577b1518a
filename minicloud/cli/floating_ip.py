"""``minicloud floating-ip allocate|associate|disassociate|release|list|show``."""

from __future__ import annotations

import argparse

from minicloud.cli import generic
from minicloud.cli.common import client
from minicloud.cli.keypair import parse_labels
from minicloud.cli.output import emit
from minicloud.network.kinds import FLOATING_IP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("floating-ip", help="public addresses 1:1 NATed to an instance's NIC")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("allocate", help="take an address of an external network's pool")
    v.add_argument("--network", required=True, metavar="NETWORK", help="the external network (name or id)")
    v.add_argument("--description", default="")
    v.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    v.set_defaults(func=allocate)
    v = verbs.add_parser("associate", help="NAT a floating IP to an instance's NIC (moving it)")
    v.add_argument("floating_ip", metavar="FLOATING_IP", help="its address or id")
    v.add_argument("instance")
    v.add_argument("--nic", metavar="PORT|MAC|IP", help="which NIC (default: the first one a router connects)")
    v.set_defaults(func=associate)
    v = verbs.add_parser("disassociate", help="stop NATing a floating IP (it stays allocated)")
    v.add_argument("floating_ip", metavar="FLOATING_IP")
    v.set_defaults(func=disassociate)
    v = verbs.add_parser("release", help="give a floating IP's address back to the pool")
    v.add_argument("floating_ip", metavar="FLOATING_IP")
    v.set_defaults(func=release)
    generic.add_verbs(verbs, FLOATING_IP, lambda c: c.floating_ips, which=("list", "show"))


def allocate(args: argparse.Namespace) -> int:
    fip = client(args).floating_ips.allocate(
        network=args.network, description=args.description, labels=parse_labels(args.label)
    )
    emit(fip, args.output)
    return 0


def associate(args: argparse.Namespace) -> int:
    emit(client(args).floating_ips.associate(args.floating_ip, args.instance, args.nic), args.output)
    return 0


def disassociate(args: argparse.Namespace) -> int:
    emit(client(args).floating_ips.disassociate(args.floating_ip), args.output)
    return 0


def release(args: argparse.Namespace) -> int:
    client(args).floating_ips.release(args.floating_ip)
    return 0
