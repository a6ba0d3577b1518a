"""``minicloud bucket create|list|show|set|delete``: S3 buckets of the project (the S3 endpoint: ``minicloud s3``)."""

from __future__ import annotations

import argparse

from minicloud.cli import generic
from minicloud.cli.common import CommandError, client
from minicloud.cli.keypair import parse_labels
from minicloud.cli.output import emit
from minicloud.objects.kinds import BUCKET


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bucket", help="S3 buckets (object storage)")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("create", help="create a bucket (3-63 lower-case letters, digits, '.' and '-')")
    v.add_argument("name")
    v.add_argument("--versioning", action="store_true", help="keep every version of each object")
    v.add_argument("--public-read", action="store_true", help="anyone may download its objects without a key")
    v.add_argument("--max-bytes", type=int, default=0, metavar="N", help="quota on the bytes it holds (0: none)")
    v.add_argument("--max-objects", type=int, default=0, metavar="N", help="quota on its objects (0: none)")
    v.add_argument("--description", default="")
    v.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    v.add_argument("--wait", action="store_true", help="wait until the bucket is ready")
    v.set_defaults(func=create)
    generic.add_verbs(verbs, BUCKET, lambda c: c.buckets, which=("list", "show"))
    v = verbs.add_parser("set", help="change a bucket's versioning, public read or quota")
    v.add_argument("name")
    v.add_argument("--versioning", choices=("on", "off"))
    v.add_argument("--public-read", choices=("on", "off"))
    v.add_argument("--max-bytes", type=int, metavar="N", help="quota on the bytes it holds (0: none)")
    v.add_argument("--max-objects", type=int, metavar="N", help="quota on its objects (0: none)")
    v.set_defaults(func=configure)
    v = verbs.add_parser("delete", help="delete an empty bucket")
    v.add_argument("name")
    v.set_defaults(func=delete)


def _on(value: str | None) -> bool | None:
    return None if value is None else value == "on"


def create(args: argparse.Namespace) -> int:
    c = client(args)
    bucket = c.buckets.create(
        name=args.name, versioning=args.versioning, public_read=args.public_read, quota_bytes=args.max_bytes,
        quota_objects=args.max_objects, description=args.description, labels=parse_labels(args.label),
    )  # fmt: skip
    if args.wait:
        try:
            bucket = c.buckets.wait(bucket.id, until=lambda b: b.status.state in ("ready", "error"))
        except TimeoutError as exc:
            raise CommandError(str(exc)) from None
        if bucket.status.state == "error":
            emit(bucket, args.output)
            raise CommandError(f"bucket {bucket.name} is in error: {bucket.status.reason}")
    emit(bucket, args.output)
    return 0


def configure(args: argparse.Namespace) -> int:
    bucket = client(args).buckets.set(
        args.name, versioning=_on(args.versioning), public_read=_on(args.public_read), quota_bytes=args.max_bytes,
        quota_objects=args.max_objects,
    )  # fmt: skip
    emit(bucket, args.output)
    return 0


def delete(args: argparse.Namespace) -> int:
    bucket = client(args).buckets.delete(args.name)
    if args.output == "table":
        print(f"Deleted bucket {args.name}" if bucket is None else f"Deleting bucket {args.name}")
    else:
        emit(bucket, args.output)
    return 0
