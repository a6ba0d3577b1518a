"""``minicloud login`` / ``minicloud logout``: a session token for a remote, from a user name and password."""

from __future__ import annotations

import argparse
import getpass
import sys

from minicloud.cli.common import CommandError
from minicloud.cli.output import emit
from minicloud.client import Client
from minicloud.client.remotes import load_config, save_config
from minicloud.model import Session


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("login", help="log in to a remote as a user; the session replaces the remote's API key")
    p.add_argument("user")
    p.add_argument("--ttl", type=int, default=3600, help="session lifetime in seconds (default 3600, at most 43200)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.set_defaults(func=login)
    p = sub.add_parser("logout", help="revoke the remote's session and forget it")
    p.set_defaults(func=logout)


def _remote(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    cfg = load_config()
    name = args.remote or cfg.default
    if not name or name not in cfg.remotes:
        raise CommandError("log in to a remote: `minicloud --remote NAME login USER` (add one with `remote add`)")
    return cfg, cfg.remotes[name]


def login(args: argparse.Namespace) -> int:
    cfg, remote = _remote(args)
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"Password for {args.user} at {remote.name}: ")
    anonymous = Client(url=remote.url, ca_pem=remote.ca_pem())
    session = anonymous.call(
        "POST", "/v1/auth/login", Session, json={"user": args.user, "password": password, "ttl": args.ttl}
    )
    remote.token = session.token
    save_config(cfg)
    if args.output == "table":
        print(f"Logged in to {remote.name} as {session.principal} until {session.expires_at}")
    else:
        emit({"principal": session.principal, "expires_at": session.expires_at}, args.output)
    return 0


def logout(args: argparse.Namespace) -> int:
    cfg, remote = _remote(args)
    if remote.token and remote.token.startswith("mcs1."):
        Client.for_remote(remote).call("POST", "/v1/auth/logout")
    remote.token = None
    save_config(cfg)
    if args.output == "table":
        print(f"Logged out of {remote.name}")
    return 0
