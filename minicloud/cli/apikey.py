"""``minicloud apikey create|list|show|delete``: bearer credentials for HTTPS clients."""

from __future__ import annotations

import argparse

from minicloud.cli import generic
from minicloud.cli.common import client
from minicloud.cli.output import col, emit
from minicloud.iam.kinds import APIKEY

COLUMNS = [col(c.header, c.path) for c in APIKEY.columns]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("apikey", help="API keys for remote (HTTPS) access")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("create", help="create an API key; its secret is printed once")
    v.add_argument("name", nargs="?", help="the key's name (default: <user>-<random>)")
    v.add_argument("--description", default="")
    v.add_argument("--user", help="the user or service account the key acts as (default: you; root: admin)")
    v.add_argument("--expires-in", type=int, metavar="SECONDS", help="lifetime (default: no expiry)")
    v.set_defaults(func=create)
    generic.add_verbs(verbs, APIKEY, lambda c: c.apikeys, ("list", "show"))
    v = verbs.add_parser("delete", help="revoke an API key")
    v.add_argument("name")
    v.set_defaults(func=delete)


def create(args: argparse.Namespace) -> int:
    key = client(args).apikeys.create(
        name=args.name, description=args.description, expires_in=args.expires_in, user=args.user
    )
    if args.output == "table":
        print(f"Created API key {key.name} ({key.id}). Its secret, shown only now:")
        print(f"  {key.secret}")
    else:
        emit(key, args.output)
    return 0


def delete(args: argparse.Namespace) -> int:
    client(args).apikeys.delete(args.name)
    if args.output == "table":
        print(f"Revoked API key {args.name}")
    return 0
