"""``minicloud node show``: facts about the node the client talks to; ``node list|cordon|uncordon``: the compute
nodes as the scheduler sees them (:mod:`minicloud.cli.node_states`)."""

from __future__ import annotations

import argparse

from minicloud.cli import node_states
from minicloud.cli.common import client
from minicloud.cli.output import emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("node", help="the node you are connected to")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    verbs.add_parser("show", help="CPUs, memory, disks, virtualization and versions").set_defaults(func=show)
    node_states.register(verbs)


def show(args: argparse.Namespace) -> int:
    c = client(args)
    node = c.node()
    if args.output != "table":
        emit(node, args.output)
        return 0
    v = c.version()
    gib = 1024**3
    virt = node.virtualization
    print(f"name:        {node.name}")
    print(f"os:          {node.os} ({node.arch}, kernel {node.kernel})")
    print(f"cpus:        {node.cpu_count} x {node.cpu_model}")
    print(f"memory:      {node.memory_available_bytes / gib:.1f} GiB free of {node.memory_total_bytes / gib:.1f} GiB")
    print(f"load:        {' '.join(str(x) for x in node.load_average)}")
    for d in node.disks:
        print(
            f"disk:        {d.mountpoint} ({d.device}, {d.fstype}) {d.free_bytes / gib:.1f} GiB free of {d.total_bytes / gib:.1f} GiB"
        )
    print(f"virt type:   {virt.virt_type} ({virt.reason})")
    if node.gpus is not None:
        g = node.gpus
        if g.count:
            driver = f", driver {g.driver_version}" if g.driver_version else ""
            print(f"gpus:        {', '.join(g.models)} ({g.capable} of {g.count} passthrough-capable{driver})")
            if g.reason:
                print(f"             NVML: {g.reason}")
        else:
            print(f"gpus:        none ({g.reason})")
    print(f"version:     {node.version}")
    print(f"ca:          {v.ca_fingerprint}")
    return 0
