"""``minicloud accesskey create|list|show|delete``: S3-style access key pairs for the object store."""

from __future__ import annotations

import argparse

from minicloud.cli.common import client
from minicloud.cli.output import col, emit
from minicloud.model import AccessKey, AccessKeySecret

COLUMNS = [col("access key id", "id"), col("name", "name"), col("principal", "principal"), col("created", "created_at")]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("accesskey", help="S3-style access keys (object store)")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("create", help="create an access key pair; the secret is printed once")
    v.add_argument("name")
    v.add_argument("--user", help="the user or service account it acts as (default: you; root: admin)")
    v.add_argument("--description", default="")
    v.set_defaults(func=create)
    verbs.add_parser("list", help="list access keys").set_defaults(func=list_)
    v = verbs.add_parser("show", help="show an access key (never its secret)")
    v.add_argument("name")
    v.set_defaults(func=show)
    v = verbs.add_parser("delete", help="delete an access key")
    v.add_argument("name")
    v.set_defaults(func=delete)


def create(args: argparse.Namespace) -> int:
    body = {"name": args.name, "description": args.description, "user": args.user}
    key = client(args).call(
        "POST", "/v1/accesskeys", AccessKeySecret, json={k: v for k, v in body.items() if v is not None}
    )
    if args.output == "table":
        print(f"Access key id:     {key.id}")
        print(f"Secret access key: {key.secret_access_key}   (shown only now)")
    else:
        emit(key, args.output)
    return 0


def list_(args: argparse.Namespace) -> int:
    emit(list(client(args).paginate("/v1/accesskeys", AccessKey)), args.output, COLUMNS)
    return 0


def show(args: argparse.Namespace) -> int:
    emit(client(args).call("GET", f"/v1/accesskeys/{args.name}", AccessKey), args.output)
    return 0


def delete(args: argparse.Namespace) -> int:
    client(args).call("DELETE", f"/v1/accesskeys/{args.name}")
    if args.output == "table":
        print(f"Deleted access key {args.name}")
    return 0
