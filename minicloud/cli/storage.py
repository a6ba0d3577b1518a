"""``minicloud storage enable|show`` and ``minicloud storage disk add|list|remove``: the Ceph cluster minicloud runs
and the disks it is given (cluster administrators; ``show`` for everyone with a role)."""

from __future__ import annotations

import argparse
import re

from minicloud.cli.common import CommandError, client
from minicloud.cli.output import col, emit
from minicloud.storage.kinds import STORAGE_DISK

DISK_COLUMNS = [col(c.header, c.path) for c in STORAGE_DISK.columns]
_UNITS = {"": 1 << 30, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """``10G``, ``500M``, ``1T``, ``10GiB`` → bytes (binary units; a bare number is GiB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size such as 10G, 500M or 1T")
    return int(float(m[1]) * _UNITS[m[2].upper()])


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("storage", help="the Ceph cluster minicloud runs, and its disks")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("enable", help="bootstrap Ceph (administrators): a monitor, a manager and a first disk")
    v.add_argument("--node", help="the node to bootstrap on (default: the node answering)")
    v.add_argument("--file-size", type=parse_size, metavar="SIZE", help="the first disk: a file OSD (default 10G)")
    v.add_argument("--no-disk", action="store_true", help="no first disk (add one with `storage disk add`)")
    v.add_argument("--wait", action="store_true", help="wait until the cluster is ready")
    v.add_argument("--timeout", type=float, default=600, help="give up waiting after this many seconds")
    v.set_defaults(func=enable)
    v = verbs.add_parser("show", help="health in plain words, capacity, placement groups, OSDs, disks and pools")
    v.set_defaults(func=show)

    d = verbs.add_parser("disk", help="the disks (OSDs) given to Ceph")
    dverbs = d.add_subparsers(dest="disk_verb", metavar="<verb>", required=True)
    v = dverbs.add_parser("add", help="give Ceph a block device, or a file of --file SIZE, on a node")
    v.add_argument("device", nargs="?", help="a block device such as /dev/vdb (all its data is lost)")
    v.add_argument("--file", type=parse_size, metavar="SIZE", help="a file OSD of this size instead (1G..16T)")
    v.add_argument("--node", help="the node (default: the node answering)")
    v.set_defaults(func=disk_add)
    v = dverbs.add_parser("list", help="list the disks and their OSDs")
    v.set_defaults(func=disk_list)
    v = dverbs.add_parser("remove", help="drain a disk's OSD (its data moves to the others), then remove it")
    v.add_argument("name", help="its name or id (`minicloud storage disk list`)")
    v.set_defaults(func=disk_remove)


def enable(args: argparse.Namespace) -> int:
    c = client(args)
    shown = c.storage.enable(node=args.node, file_size_bytes=args.file_size, no_disk=args.no_disk)
    if args.wait:
        try:
            shown = c.storage.wait_ready(timeout=args.timeout)
        except (RuntimeError, TimeoutError) as exc:
            raise CommandError(str(exc)) from None
    emit(shown, args.output)
    return 0


def show(args: argparse.Namespace) -> int:
    emit(client(args).storage.show(), args.output)
    return 0


def disk_add(args: argparse.Namespace) -> int:
    if (args.device is None) == (args.file is None):
        raise CommandError("give a block device (DEVICE) or --file SIZE, not both or neither")
    emit(client(args).storage.add_disk(node=args.node, device=args.device, file_size_bytes=args.file), args.output)
    return 0


def disk_list(args: argparse.Namespace) -> int:
    emit(client(args).storage.disks(), args.output, DISK_COLUMNS)
    return 0


def disk_remove(args: argparse.Namespace) -> int:
    emit(client(args).storage.remove_disk(args.name), args.output)
    return 0
