"""``minicloud pool create|list|show|delete``: where volumes and images live, and their volumes' default I/O limits
(a pool is the volume type; create and delete: administrators)."""

from __future__ import annotations

import argparse

from minicloud.cli import generic
from minicloud.cli.common import client
from minicloud.cli.keypair import parse_labels
from minicloud.cli.output import emit
from minicloud.storage.kinds import POOL


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pool", help="storage pools: Ceph (every node) or local (one node's disk)")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("create", help="create a pool (administrators)")
    v.add_argument("name")
    v.add_argument("--driver", required=True, choices=["ceph", "local"])
    v.add_argument("--ceph-pool", metavar="RADOS_POOL", help="ceph: the RADOS pool (default: the pool's name)")
    v.add_argument("--default", action="store_true", help="volumes made without --pool go here")
    v.add_argument("--description", default="")
    v.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    for flag, what in (
        ("--read-iops", "read operations per second"),
        ("--write-iops", "write operations per second"),
        ("--read-bytes-sec", "bytes read per second"),
        ("--write-bytes-sec", "bytes written per second"),
    ):
        v.add_argument(flag, type=int, default=0, metavar="N", help=f"its volumes' limit of {what} (0: none)")
    v.set_defaults(func=create)
    generic.add_verbs(verbs, POOL, lambda c: c.pools)


def create(args: argparse.Namespace) -> int:
    pool = client(args).pools.create(
        name=args.name, driver=args.driver, ceph_pool=args.ceph_pool, default=args.default or None,
        description=args.description, labels=parse_labels(args.label),
        qos={"read_iops_sec": args.read_iops, "write_iops_sec": args.write_iops,
             "read_bytes_sec": args.read_bytes_sec, "write_bytes_sec": args.write_bytes_sec},
    )  # fmt: skip
    emit(pool, args.output)
    return 0
