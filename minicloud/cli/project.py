"""``minicloud project create|list|show|delete``: tenancy boundaries (use them with ``--project NAME``)."""

from __future__ import annotations

import argparse

from minicloud.cli import generic
from minicloud.cli.common import client
from minicloud.cli.output import emit
from minicloud.iam.kinds import PROJECT


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("project", help="projects: every resource belongs to one (--project NAME)")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("create", help="create a project")
    v.add_argument("name")
    v.add_argument("--description", default="")
    v.set_defaults(func=create)
    generic.add_verbs(verbs, PROJECT, lambda c: c.projects)  # delete: only an empty project


def create(args: argparse.Namespace) -> int:
    emit(client(args).projects.create(name=args.name, description=args.description), args.output)
    return 0
