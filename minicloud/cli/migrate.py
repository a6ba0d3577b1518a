"""``minicloud instance migrate NAME [--node N] [--cold] [--wait]``: move an instance to another node, and ``minicloud
node drain NODE [--wait]``: cordon a node and move what can move off it (cluster administrators;
:mod:`minicloud.compute.migration`). Registered by :mod:`minicloud.cli.instance` and :mod:`minicloud.cli.node_states`."""

from __future__ import annotations

import argparse

from minicloud.cli.common import client, wait_operation
from minicloud.cli.output import emit


def register(verbs: argparse._SubParsersAction) -> None:
    v = verbs.add_parser("migrate", help="live-migrate a running instance to another node (administrators)")
    v.add_argument("name")
    v.add_argument("--node", help="the target node (default: the node with the most room that can run it)")
    v.add_argument("--cold", action="store_true", help="move it stopped (not built yet: refused)")
    v.add_argument("--wait", action="store_true", help="wait until the migration ends, showing its phases")
    v.set_defaults(func=migrate)


def register_drain(verbs: argparse._SubParsersAction) -> None:
    v = verbs.add_parser("drain", help="cordon NODE and live-migrate its instances away (administrators)")
    v.add_argument("node")
    v.add_argument("--wait", action="store_true", help="wait until it is done; the result lists what moved and stays")
    v.set_defaults(func=drain)


def drain(args: argparse.Namespace) -> int:
    c = client(args)
    op = c.nodes.drain(args.node)
    if args.wait:
        op = wait_operation(c, op, args.output)
    emit(op, args.output)
    return 0


def migrate(args: argparse.Namespace) -> int:
    c = client(args)
    op = c.instances.migrate(args.name, node=args.node, cold=args.cold)
    if args.wait:
        op = wait_operation(c, op, args.output)
    emit(op, args.output)
    return 0
