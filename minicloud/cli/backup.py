"""``minicloud volume backup create|list|show|restore|delete``, ``minicloud backup-schedule …`` and
``minicloud backup-target …``: volume backups into buckets, on a schedule, to this cluster's S3 or another."""

from __future__ import annotations

import argparse
from pathlib import Path

from minicloud.cli import generic
from minicloud.cli.common import CommandError, client
from minicloud.cli.keypair import parse_labels
from minicloud.cli.output import col, emit
from minicloud.storage.backup_kinds import BACKUP_SCHEDULE, BACKUP_TARGET, DEFAULT_BUCKET, VOLUME_BACKUP, parse_every


def _every(text: str) -> int:
    try:
        return parse_every(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register_volume_verb(verbs: argparse._SubParsersAction) -> None:
    """``volume backup …`` (called by :mod:`minicloud.cli.volume`)."""
    p = verbs.add_parser("backup", help="backups of volumes into buckets (full or incremental), and restores")
    sub = p.add_subparsers(dest="backup_verb", metavar="<verb>", required=True)
    v = sub.add_parser("create", help="back up a volume into a bucket")
    v.add_argument("volume")
    v.add_argument("--bucket", required=True, help="a bucket of the project (or of --target's endpoint)")
    v.add_argument("--incremental", action="store_true", help="only what changed since the last backup there")
    v.add_argument("--target", help="a backup target (`minicloud backup-target list`): another S3 endpoint")
    v.add_argument("--name", help="the backup's name (default: VOLUME-TIME)")
    v.add_argument("--description", default="")
    v.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    v.add_argument("--wait", action="store_true", help="wait until the backup is stored")
    v.add_argument("--timeout", type=float, default=3600)
    v.set_defaults(func=create)
    v = sub.add_parser("list", help="list volume backups (of one volume when given)")
    v.add_argument("volume", nargs="?")
    v.set_defaults(func=list_)
    generic.add_verbs(sub, VOLUME_BACKUP, lambda c: c.volume_backups, which=("show",))
    v = sub.add_parser("restore", help="restore a backup into a new volume")
    v.add_argument("backup")
    v.add_argument("--name", required=True, help="the new volume's name")
    v.add_argument("--pool", help="its pool (default: the backed-up volume's)")
    v.add_argument("--size", type=int, metavar="GIB", help="its size (default: the backup's)")
    v.add_argument("--wait", action="store_true", help="wait until the volume is available")
    v.add_argument("--timeout", type=float, default=3600)
    v.set_defaults(func=restore)
    v = sub.add_parser("delete", help="delete a backup (not one later backups of its chain need)")
    v.add_argument("backup")
    v.set_defaults(func=delete)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backup-schedule", help="volume (or cluster state) backups on a schedule, with retention")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("create", help="back up a volume (or the cluster state) every interval, keeping N")
    what = v.add_mutually_exclusive_group(required=True)
    what.add_argument("--volume")
    what.add_argument("--state", action="store_true", help="the cluster state database (administrators)")
    v.add_argument("--bucket", help=f"default: the project's bucket {DEFAULT_BUCKET!r}, made on first use")
    v.add_argument("--every", type=_every, required=True, metavar="INTERVAL", help="e.g. 1d, 6h, 30m")
    v.add_argument("--keep", type=int, required=True, help="how many backups to keep")
    v.add_argument("--full-every", type=int, default=0, metavar="N",
                   help="a full backup every N backups, incremental between (default: --keep)")  # fmt: skip
    v.add_argument("--target", help="a backup target: another S3 endpoint")
    v.add_argument("--name")
    v.add_argument("--description", default="")
    v.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    v.set_defaults(func=create_schedule)
    generic.add_verbs(verbs, BACKUP_SCHEDULE, lambda c: c.backup_schedules)

    p = sub.add_parser("backup-target", help="other S3 endpoints backups can go to")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("create", help="record an S3 endpoint, its key and CA bundle")
    v.add_argument("name")
    v.add_argument("--endpoint", required=True, help="https://HOST[:PORT]")
    v.add_argument("--access-key", required=True)
    v.add_argument("--secret-key-file", required=True, type=Path, help="a file holding the secret key")
    v.add_argument("--region", default="us-east-1")
    v.add_argument("--ca-bundle", type=Path, help="PEM file of the CA the endpoint's certificate chains to")
    v.add_argument("--description", default="")
    v.set_defaults(func=create_target)
    generic.add_verbs(verbs, BACKUP_TARGET, lambda c: c.backup_targets)


def create(args: argparse.Namespace) -> int:
    c = client(args)
    b = c.volume_backups.create(
        volume=args.volume, bucket=args.bucket, incremental=args.incremental, target=args.target, name=args.name,
        description=args.description, labels=parse_labels(args.label),
    )  # fmt: skip
    if args.wait:
        try:
            b = c.volume_backups.wait(b.id, timeout=args.timeout)
        except TimeoutError as exc:
            raise CommandError(str(exc)) from None
        if b.status.state == "error":
            emit(b, args.output)
            raise CommandError(f"backup {b.name} failed: {b.status.reason}")
    emit(b, args.output)
    return 0


def list_(args: argparse.Namespace) -> int:
    items = client(args).volume_backups.list()
    if args.volume:
        items = [b for b in items if args.volume in (b.volume, b.volume_id)]
    emit(items, args.output, [col(c.header, c.path) for c in VOLUME_BACKUP.columns])
    return 0


def restore(args: argparse.Namespace) -> int:
    c = client(args)
    vol = c.volume_backups.restore(args.backup, name=args.name, pool=args.pool, size_gib=args.size)
    if args.wait:
        try:
            got = c.volumes.wait(vol.id, until=lambda v: v.status.state in ("available", "error"), timeout=args.timeout)
        except TimeoutError as exc:
            raise CommandError(str(exc)) from None
        if got is not None:
            vol = got
        if vol.status.state == "error":
            emit(vol, args.output)
            raise CommandError(f"the restore into {vol.name} failed: {vol.status.reason}")
    emit(vol, args.output)
    return 0


def delete(args: argparse.Namespace) -> int:
    b = client(args).volume_backups.delete(args.backup)
    if b is not None:
        emit(b, args.output)
    return 0


def create_schedule(args: argparse.Namespace) -> int:
    s = client(args).backup_schedules.create(
        bucket=args.bucket, every_seconds=args.every, keep=args.keep, full_every=args.full_every,
        volume=args.volume, state=args.state or None, target=args.target, name=args.name,
        description=args.description, labels=parse_labels(args.label),
    )  # fmt: skip
    emit(s, args.output)
    return 0


def create_target(args: argparse.Namespace) -> int:
    try:
        secret = args.secret_key_file.read_text().strip()
        ca = args.ca_bundle.read_text() if args.ca_bundle else None
    except OSError as exc:
        raise CommandError(f"cannot read {exc.filename}: {exc.strerror}") from None
    t = client(args).backup_targets.create(
        name=args.name, endpoint=args.endpoint, access_key=args.access_key, secret_key=secret, region=args.region,
        ca_bundle=ca, description=args.description,
    )  # fmt: skip
    emit(t, args.output)
    return 0
