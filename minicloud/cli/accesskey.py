"""``minicloud accesskey create|list|show|delete``: S3-style access key pairs for the object store."""

from __future__ import annotations

import argparse

from minicloud.cli import generic
from minicloud.cli.common import client
from minicloud.cli.output import col, emit
from minicloud.iam.kinds import ACCESSKEY

COLUMNS = [col(c.header, c.path) for c in ACCESSKEY.columns]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("accesskey", help="S3-style access keys (object store)")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("create", help="create an access key pair; the secret is printed once")
    v.add_argument("name")
    v.add_argument("--user", help="the user or service account it acts as (default: you; root: admin)")
    v.add_argument("--description", default="")
    v.set_defaults(func=create)
    generic.add_verbs(verbs, ACCESSKEY, lambda c: c.accesskeys)


def create(args: argparse.Namespace) -> int:
    key = client(args).accesskeys.create(name=args.name, user=args.user, description=args.description)
    if args.output == "table":
        print(f"Access key id:     {key.id}")
        print(f"Secret access key: {key.secret_access_key}   (shown only now)")
    else:
        emit(key, args.output)
    return 0
