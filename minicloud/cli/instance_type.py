"""``minicloud type list|show|create|delete``: instance types (machine shapes)."""

from __future__ import annotations

import argparse

from minicloud.cli.common import client
from minicloud.cli.output import col, emit
from minicloud.compute.kinds import INSTANCE_TYPE

COLUMNS = [col(c.header, c.path) for c in INSTANCE_TYPE.columns]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("type", help="instance types: vCPUs, memory and disk of an instance")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("list", help="list instance types (built-in and custom)")
    v.set_defaults(func=list_)
    v = verbs.add_parser("show", help="show an instance type")
    v.add_argument("name")
    v.set_defaults(func=show)
    v = verbs.add_parser("create", help="define a custom instance type (cluster administrators)")
    v.add_argument("name")
    v.add_argument("--vcpus", type=int, required=True)
    v.add_argument("--memory", type=int, required=True, metavar="MIB", help="memory in MiB")
    v.add_argument("--disk", type=int, required=True, metavar="GIB", help="root disk in GiB")
    v.add_argument("--description", default="")
    v.add_argument("--gpus", type=int, default=0, metavar="N", help="GPUs passed through to each instance (VFIO)")
    v.add_argument(
        "--gpu-model", default="", metavar="PATTERN", help='only GPUs whose model matches, e.g. "H100*" (with --gpus)'
    )
    v.set_defaults(func=create)
    v = verbs.add_parser("delete", help="delete a custom instance type")
    v.add_argument("name")
    v.set_defaults(func=delete)


def list_(args: argparse.Namespace) -> int:
    emit(client(args).types.list(), args.output, COLUMNS)
    return 0


def show(args: argparse.Namespace) -> int:
    emit(client(args).types.get(args.name), args.output)
    return 0


def create(args: argparse.Namespace) -> int:
    t = client(args).types.create(
        name=args.name, vcpus=args.vcpus, memory_mib=args.memory, disk_gib=args.disk, description=args.description,
        gpus=args.gpus, gpu_model=args.gpu_model,
    )  # fmt: skip
    emit(t, args.output)
    return 0


def delete(args: argparse.Namespace) -> int:
    client(args).types.delete(args.name)
    if args.output == "table":
        print(f"Deleted instance type {args.name}")
    return 0
