"""``minicloud volume create|list|show|attach|detach|extend|flatten|delete``: block devices in a pool, attachable to one
instance at a time."""

from __future__ import annotations

import argparse

from minicloud.cli import generic
from minicloud.cli.common import CommandError, client
from minicloud.cli.keypair import parse_labels
from minicloud.cli.output import emit
from minicloud.client import Client
from minicloud.model.storage import Volume
from minicloud.storage.kinds import VOLUME


def _wait_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--wait", action="store_true", help=f"wait until the volume {what}")
    p.add_argument("--timeout", type=float, default=600, help="give up waiting after this many seconds (default 600)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("volume", help="block storage volumes")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("create", help="create a volume: blank, from an image or from a snapshot")
    v.add_argument("name")
    v.add_argument("--size", type=int, required=True, metavar="GIB", help="its size in GiB (1..65536)")
    v.add_argument("--pool", help="the pool (`minicloud pool list`; default: the default pool)")
    source = v.add_mutually_exclusive_group()
    source.add_argument("--image", help="copy this image into it (the size must hold the image)")
    source.add_argument("--snapshot", help="clone this snapshot (in the snapshot's pool)")
    v.add_argument("--description", default="")
    v.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    for flag, what in (
        ("--read-iops", "read operations per second"),
        ("--write-iops", "write operations per second"),
        ("--read-bytes-sec", "bytes read per second"),
        ("--write-bytes-sec", "bytes written per second"),
    ):
        v.add_argument(flag, type=int, default=0, metavar="N", help=f"limit {what} (0: none)")
    _wait_flag(v, "is available")
    v.set_defaults(func=create)
    generic.add_verbs(verbs, VOLUME, lambda c: c.volumes, which=("list", "show"))
    v = verbs.add_parser("attach", help="attach a volume to an instance as its next free disk (vdb, vdc …)")
    v.add_argument("name")
    v.add_argument("--instance", required=True)
    v.add_argument("--device", metavar="vdX", help="the guest disk (default: the next free one)")
    _wait_flag(v, "is in use")
    v.set_defaults(func=attach)
    v = verbs.add_parser("detach", help="detach a volume from its instance")
    v.add_argument("name")
    v.add_argument("--force", action="store_true", help="do not wait for the guest to release it")
    _wait_flag(v, "is available")
    v.set_defaults(func=detach)
    v = verbs.add_parser("extend", help="grow a volume (also while attached)")
    v.add_argument("name")
    v.add_argument("--size", type=int, required=True, metavar="GIB", help="the new size in GiB")
    v.set_defaults(func=extend)
    v = verbs.add_parser(
        "flatten", help="copy the data of the snapshot a volume was made from into it, so the snapshot can be deleted"
    )
    v.add_argument("name")
    _wait_flag(v, "is flattened")
    v.set_defaults(func=flatten)
    v = verbs.add_parser("delete", help="delete a volume and its snapshots")
    v.add_argument("name")
    v.add_argument("--force", action="store_true", help="administrators: drop the record even if no node removes it")
    _wait_flag(v, "is gone")
    v.set_defaults(func=delete)
    from minicloud.cli import backup

    backup.register_volume_verb(verbs)


def _finish(c: Client, args: argparse.Namespace, vol: Volume | None, states: tuple[str, ...]) -> int:
    if vol is not None and getattr(args, "wait", False):
        try:
            vol = c.volumes.wait(vol.id, until=lambda v: v.status.state in (*states, "error"), timeout=args.timeout)
        except TimeoutError as exc:
            raise CommandError(str(exc)) from None
        if vol is not None and vol.status.state == "error":
            emit(vol, args.output)
            raise CommandError(f"volume {vol.name} is in error: {vol.status.reason}")
    if vol is not None:
        emit(vol, args.output)
    elif args.output == "table":
        print(f"Deleted volume {args.name}")
    return 0


def create(args: argparse.Namespace) -> int:
    c = client(args)
    qos = {
        "read_iops_sec": args.read_iops,
        "write_iops_sec": args.write_iops,
        "read_bytes_sec": args.read_bytes_sec,
        "write_bytes_sec": args.write_bytes_sec,
    }
    vol = c.volumes.create(
        name=args.name, size_gib=args.size, pool=args.pool, image=args.image, snapshot=args.snapshot, qos=qos,
        description=args.description, labels=parse_labels(args.label),
    )  # fmt: skip
    return _finish(c, args, vol, ("available",))


def attach(args: argparse.Namespace) -> int:
    c = client(args)
    return _finish(c, args, c.volumes.attach(args.name, instance=args.instance, device=args.device), ("in-use",))


def detach(args: argparse.Namespace) -> int:
    c = client(args)
    return _finish(c, args, c.volumes.detach(args.name, force=args.force), ("available",))


def extend(args: argparse.Namespace) -> int:
    emit(client(args).volumes.extend(args.name, size_gib=args.size), args.output)
    return 0


def flatten(args: argparse.Namespace) -> int:
    c = client(args)
    vol = c.volumes.flatten(args.name)
    if args.wait:
        try:
            vol = c.volumes.wait(
                vol.id, until=lambda v: v.status.flattened or v.status.state == "error", timeout=args.timeout
            )
        except TimeoutError as exc:
            raise CommandError(str(exc)) from None
        if vol is None:
            raise CommandError(f"volume {args.name} was deleted before it was flattened")
        if not vol.status.flattened:
            emit(vol, args.output)
            raise CommandError(f"volume {vol.name} is in error: {vol.status.reason}")
    emit(vol, args.output)
    return 0


def delete(args: argparse.Namespace) -> int:
    c = client(args)
    vol = c.volumes.delete(args.name, force=args.force)
    if vol is not None and args.wait:
        try:
            vol = c.volumes.wait(vol.id, until=lambda v: v.status.state == "error", timeout=args.timeout)
        except TimeoutError as exc:
            raise CommandError(str(exc)) from None
        if vol is not None:
            raise CommandError(f"volume {vol.name} is in error: {vol.status.reason}")
    if args.output == "table":
        print(f"Deleted volume {args.name}" if vol is None else f"Deleting volume {args.name}")
    else:
        emit(vol, args.output)
    return 0
