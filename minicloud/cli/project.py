"""``minicloud project create|list|show|delete``: tenancy boundaries (use them with ``--project NAME``)."""

from __future__ import annotations

import argparse

from minicloud.cli.common import client
from minicloud.cli.output import col, emit
from minicloud.model import Project

COLUMNS = [col("name", "name"), col("description", "description"), col("id", "id"), col("created", "created_at")]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("project", help="projects: every resource belongs to one (--project NAME)")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("create", help="create a project")
    v.add_argument("name")
    v.add_argument("--description", default="")
    v.set_defaults(func=create)
    verbs.add_parser("list", help="list projects").set_defaults(func=list_)
    v = verbs.add_parser("show", help="show a project")
    v.add_argument("name")
    v.set_defaults(func=show)
    v = verbs.add_parser("delete", help="delete an empty project")
    v.add_argument("name")
    v.set_defaults(func=delete)


def create(args: argparse.Namespace) -> int:
    body = {"name": args.name, "description": args.description}
    emit(client(args).call("POST", "/v1/projects", Project, json=body), args.output)
    return 0


def list_(args: argparse.Namespace) -> int:
    emit(list(client(args).paginate("/v1/projects", Project)), args.output, COLUMNS)
    return 0


def show(args: argparse.Namespace) -> int:
    emit(client(args).call("GET", f"/v1/projects/{args.name}", Project), args.output)
    return 0


def delete(args: argparse.Namespace) -> int:
    client(args).call("DELETE", f"/v1/projects/{args.name}")
    if args.output == "table":
        print(f"Deleted project {args.name}")
    return 0
