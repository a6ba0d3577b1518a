"""``minicloud whoami``: who the server takes you for, with which credential, through which remote and CA."""

from __future__ import annotations

import argparse
from typing import Any

from minicloud.cli.common import client
from minicloud.cli.output import builtins, emit
from minicloud.client import Client
from minicloud.client.remotes import Remote, load_config
from minicloud.model import WhoAmI


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "whoami",
        help="who you are on the server: principal, roles, credential and its expiry, remote and CA",
        description="Ask the server who the credential in use belongs to (GET /v1/whoami), like "
        "`aws sts get-caller-identity`. Any authenticated principal may ask.",
    )
    p.set_defaults(func=whoami)


def _remote_in_use(args: argparse.Namespace, c: Client) -> Remote | None:
    """The remote ``c`` talks to (``--remote``, or the default one when there is no local socket); None: the socket."""
    if c.socket_path is not None:
        return None
    cfg = load_config()
    return cfg.remotes.get(getattr(args, "remote", None) or cfg.default or "")


def describe(me: WhoAmI, c: Client, remote: Remote | None) -> dict[str, Any]:
    """What ``whoami`` prints: the server's answer plus the client's side (endpoint, remote, pinned CA)."""
    out = builtins(me)
    out["endpoint"] = c.endpoint
    out["remote"] = remote.name if remote is not None else None
    out["pinned_ca_fingerprint"] = remote.ca_fingerprint if remote is not None else None
    return out


def whoami(args: argparse.Namespace) -> int:
    c = client(args)
    me = c.whoami()
    remote = _remote_in_use(args, c)
    if args.output != "table":
        emit(describe(me, c, remote), args.output)
        return 0
    who = f"{me.principal}" + (f" ({me.kind} {me.name}, id {me.id})" if me.id else "")
    roles = "; ".join(f"{b.role} in {b.project}" if b.project else f"{b.role} cluster-wide" for b in me.bindings)
    cred = me.credential
    if cred.type == "socket":
        credential = "the node's root Unix socket (local root: may do everything)"
    else:
        label = "API key" if cred.type == "apikey" else "login session"
        named = f" ({cred.name})" if cred.name else ""
        credential = f"{label} {cred.id}{named}, " + (
            f"expires {cred.expires_at}" if cred.expires_at else "never expires"
        )
    print(f"principal:   {who}")
    print(f"admin:       {'yes' if me.admin else 'no'}")
    if cred.type != "socket":
        print(f"roles:       {roles or 'none (ask an owner or admin for a role binding)'}")
        print(f"projects:    {', '.join(me.projects) or ('every project' if me.admin else '-')}")
    print(f"credential:  {credential}")
    print(f"node:        {me.node}")
    if remote is not None:
        print(f"remote:      {remote.name} ({remote.url})")
        print(f"ca:          {remote.ca_fingerprint} (pinned)")
    else:
        print(f"endpoint:    {c.endpoint}")
        print(f"ca:          {me.ca_fingerprint}")
    return 0
