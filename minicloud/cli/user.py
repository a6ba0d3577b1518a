"""``minicloud user create|list|show|delete`` and ``minicloud role list|grant|revoke|bindings|create|delete``."""

from __future__ import annotations

import argparse
import getpass
import sys

from minicloud.cli import generic
from minicloud.cli.common import CommandError, client
from minicloud.cli.output import col, emit
from minicloud.iam.kinds import ROLE, ROLEBINDING, USER

USER_COLUMNS = [col(c.header, c.path) for c in USER.columns]
BINDING_COLUMNS = [col(c.header, c.path) for c in ROLEBINDING.columns]
ROLE_COLUMNS = [col(c.header, c.path) for c in ROLE.columns]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("user", help="users and service accounts")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("create", help="create a user (or, with --service, a service account)")
    v.add_argument("name")
    v.add_argument("--email", default="")
    v.add_argument("--service", action="store_true", help="a service account: API keys only, no password")
    v.add_argument("--password-stdin", action="store_true", help="read a password from stdin (else: ask, or none)")
    v.set_defaults(func=create_user)
    # delete: the user, and with it every credential and role binding of theirs
    generic.add_verbs(verbs, USER, lambda c: c.users)

    p = sub.add_parser("role", help="roles and who holds them (RBAC)")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    verbs.add_parser("list", help="built-in and custom roles").set_defaults(func=list_roles)
    v = verbs.add_parser("grant", help="grant ROLE to a user or service account, in --project or cluster-wide")
    v.add_argument("role")
    who = v.add_mutually_exclusive_group(required=True)
    who.add_argument("--user")
    who.add_argument("--serviceaccount")
    v.add_argument("--project", dest="grant_project", metavar="P", help="the project (default: cluster-wide)")
    v.set_defaults(func=grant)
    v = verbs.add_parser("revoke", help="revoke a role binding (by id, see `role bindings`)")
    v.add_argument("id")
    v.set_defaults(func=revoke)
    v = verbs.add_parser("bindings", help="list role bindings")
    v.add_argument("--user")
    v.set_defaults(func=bindings)
    v = verbs.add_parser("create", help="define a custom role from action patterns")
    v.add_argument("name")
    v.add_argument("--allow", action="append", default=[], metavar="ACTION", help="e.g. compute:keypairs:*")
    v.add_argument("--deny", action="append", default=[], metavar="ACTION")
    v.add_argument("--scope", choices=["project", "cluster"], default="project")
    v.add_argument("--description", default="")
    v.set_defaults(func=create_role)
    v = verbs.add_parser("delete", help="delete a custom role (refused while bindings use it)")
    v.add_argument("name")
    v.set_defaults(func=delete_role)


def create_user(args: argparse.Namespace) -> int:
    body: dict[str, object] = {
        "name": args.name,
        "email": args.email,
        "type": "serviceaccount" if args.service else "user",
    }
    if args.password_stdin:
        body["password"] = sys.stdin.readline().rstrip("\n")
    elif not args.service and sys.stdin.isatty():
        password = getpass.getpass("Password (empty: none, API keys only): ")
        if password:
            if getpass.getpass("Again: ") != password:
                raise CommandError("the passwords differ")
            body["password"] = password
    emit(client(args).users.create(**body), args.output)  # type: ignore[arg-type]
    return 0


def list_roles(args: argparse.Namespace) -> int:
    emit(client(args).rolebindings.roles(), args.output, ROLE_COLUMNS)
    return 0


def grant(args: argparse.Namespace) -> int:
    principal = f"user:{args.user}" if args.user else f"serviceaccount:{args.serviceaccount}"
    c = client(args)
    scope = args.grant_project or c.project
    if scope and not c.project:
        c.project = scope  # act in that project, so its owner may grant there
    emit(c.rolebindings.grant(args.role, principal, scope), args.output)
    return 0


def revoke(args: argparse.Namespace) -> int:
    client(args).rolebindings.revoke(args.id)
    if args.output == "table":
        print(f"Revoked {args.id}")
    return 0


def bindings(args: argparse.Namespace) -> int:
    query = {"principal": f"user:{args.user}" if args.user else None}
    emit(client(args).rolebindings.list(**query), args.output, BINDING_COLUMNS)
    return 0


def create_role(args: argparse.Namespace) -> int:
    role = client(args).rolebindings.create_role(
        args.name, allow=args.allow, deny=args.deny, scope=args.scope, description=args.description
    )
    emit(role, args.output)
    return 0


def delete_role(args: argparse.Namespace) -> int:
    client(args).rolebindings.delete_role(args.name)
    if args.output == "table":
        print(f"Deleted role {args.name}")
    return 0
