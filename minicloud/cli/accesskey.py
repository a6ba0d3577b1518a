"""``minicloud accesskey create|list|show|delete|disable|enable``: S3-style access key pairs for the object store."""

from __future__ import annotations

import argparse
import re

from minicloud.cli import generic
from minicloud.cli.common import client
from minicloud.cli.output import col, emit
from minicloud.iam.kinds import ACCESSKEY

COLUMNS = [col(c.header, c.path) for c in ACCESSKEY.columns]
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def lifetime(text: str) -> int:
    """``--expires-in``: seconds from ``90m``, ``12h``, ``30d`` (a bare number is seconds)."""
    m = re.fullmatch(r"([0-9]{1,6})([smhd]?)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90m, 12h or 30d")
    return int(m.group(1)) * _UNITS[m.group(2) or "s"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("accesskey", help="S3-style access keys (object store)")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("create", help="create an access key pair; the secret is printed once")
    v.add_argument("name")
    v.add_argument("--user", help="the user or service account it acts as (default: you; root: admin)")
    v.add_argument("--description", default="")
    when = v.add_mutually_exclusive_group()
    when.add_argument("--expires-in", type=lifetime, metavar="DURATION", help="lifetime: 90m, 12h, 30d (default: none)")
    when.add_argument("--expires-at", metavar="TIME", help="RFC 3339 expiry time, e.g. 2027-06-30T00:00:00Z")
    v.set_defaults(func=create)
    generic.add_verbs(verbs, ACCESSKEY, lambda c: c.accesskeys)
    for verb, text in (("disable", "refuse the key in the object store until enabled"), ("enable", "enable it again")):
        v = verbs.add_parser(verb, help=text)
        v.add_argument("ref", metavar="ID", help="access key id or name")
        v.set_defaults(func=set_state, state=verb)


def create(args: argparse.Namespace) -> int:
    key = client(args).accesskeys.create(
        name=args.name,
        user=args.user,
        description=args.description,
        expires_in=args.expires_in,
        expires_at=args.expires_at,
    )
    if args.output == "table":
        print(f"Access key id:     {key.id}")
        print(f"Secret access key: {key.secret_access_key}   (shown only now)")
    else:
        emit(key, args.output)
    return 0


def set_state(args: argparse.Namespace) -> int:
    keys = client(args).accesskeys
    key = keys.disable(args.ref) if args.state == "disable" else keys.enable(args.ref)
    emit(key, args.output, COLUMNS)
    return 0
