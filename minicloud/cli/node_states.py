"""``minicloud node list|cordon|uncordon``: the compute nodes as the scheduler sees them (zone, liveness, cordon,
instances and capacity used), and taking a node out of (or back into) scheduling."""

from __future__ import annotations

import argparse

from minicloud.cli import migrate
from minicloud.cli.common import client
from minicloud.cli.output import col, emit

COLUMNS = [
    col("name", "name"),
    col("zone", "zone"),
    col("state", "state"),
    col("scheduling", "scheduling"),
    col("instances", "instances"),
    col("vcpus", "vcpus_text"),
    col("memory MiB", "memory_text"),
    col("reason", "cordon_reason"),
]


def register(verbs: argparse._SubParsersAction) -> None:
    verbs.add_parser("list", help="the compute nodes: zone, state, cordon, instances, capacity used").set_defaults(
        func=list_
    )
    v = verbs.add_parser("cordon", help="place no new instances on NODE (those on it stay)")
    v.add_argument("node")
    v.add_argument("--reason", default="", help="why (shown in `node list`)")
    v.set_defaults(func=cordon)
    v = verbs.add_parser("uncordon", help="place instances on NODE again")
    v.add_argument("node")
    v.set_defaults(func=uncordon)
    migrate.register_drain(verbs)


def list_(args: argparse.Namespace) -> int:
    items = client(args).nodes.list()
    if args.output != "table":
        emit(items, args.output)
        return 0
    rows = [
        {
            **{f: getattr(n, f) for f in n.__struct_fields__},
            "vcpus_text": f"{n.vcpus_used}/{n.vcpus}",
            "memory_text": f"{n.memory_used_mib}/{n.memory_mib}",
        }
        for n in items
    ]
    emit(rows, "table", COLUMNS)
    return 0


def cordon(args: argparse.Namespace) -> int:
    node = client(args).nodes.cordon(args.node, reason=args.reason)
    if args.output == "table":
        print(f"Cordoned {node.name}: no new instances are placed there (`minicloud node uncordon {node.name}`)")
    else:
        emit(node, args.output)
    return 0


def uncordon(args: argparse.Namespace) -> int:
    node = client(args).nodes.uncordon(args.node)
    if args.output == "table":
        print(f"Uncordoned {node.name}: instances may be placed there again")
    else:
        emit(node, args.output)
    return 0
