"""``minicloud remote add|list|remove|set-default``: other nodes reached over HTTPS with a pinned CA."""

from __future__ import annotations

import argparse
import hashlib
import ssl
import sys

from minicloud.cli.common import CommandError
from minicloud.cli.output import col, emit
from minicloud.client import ApiError, Client
from minicloud.client.remotes import REMOTE_NAME, Remote, load_config, save_ca, save_config
from minicloud.model import WhoAmI

COLUMNS = [
    col("name", "name"),
    col("url", "url"),
    col("default", "default"),
    col("ca fingerprint", "ca_fingerprint"),
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("remote", help="remote minicloud endpoints (HTTPS)")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("add", help="add a remote; pins its CA certificate on first use, like ssh")
    v.add_argument("name")
    v.add_argument("url", help="https://HOST:PORT")
    v.add_argument(
        "--token",
        help="an API key of any user or service account (from `minicloud init`, or `minicloud apikey create`); "
        "checked with GET /v1/whoami",
    )
    v.add_argument("--fingerprint", help="expected CA fingerprint (sha256:...), as `minicloud node show` prints it")
    v.add_argument("--accept-certificate", action="store_true", help="trust the CA shown without asking")
    v.add_argument("--default", action="store_true", help="use this remote when no local socket exists")
    v.set_defaults(func=add)
    verbs.add_parser("list", help="list remotes").set_defaults(func=list_)
    v = verbs.add_parser("remove", help="forget a remote")
    v.add_argument("name")
    v.set_defaults(func=remove)
    v = verbs.add_parser("set-default", help="make a remote the default")
    v.add_argument("name")
    v.set_defaults(func=set_default)


def pem_fingerprint(pem: str) -> str:
    return "sha256:" + hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


def add(args: argparse.Namespace) -> int:
    if not REMOTE_NAME.match(args.name):
        raise CommandError("remote names are 1-63 letters, digits, '-', '_' or '.'")
    if not args.url.startswith("https://"):
        raise CommandError(f"the URL must start with https:// (got {args.url})")
    cfg = load_config()
    if args.name in cfg.remotes:
        raise CommandError(
            f"a remote named {args.name} exists; remove it first with `minicloud remote remove {args.name}`"
        )
    # 1. Fetch the CA over an unverified connection, then decide whether to trust it.
    probe = Client(url=args.url, ca_pem=None, timeout=15)
    ca = probe.call("GET", "/v1/ca")
    probe.close()
    try:
        fp = pem_fingerprint(ca["pem"])
    except (KeyError, ValueError, TypeError):
        raise CommandError(f"{args.url} did not return a CA certificate; is it a minicloud agent?") from None
    if args.fingerprint:
        if args.fingerprint.lower() != fp:
            raise CommandError(
                f"the server's CA fingerprint is {fp}, not the expected {args.fingerprint}. "
                "Someone may be intercepting the connection; nothing was saved."
            )
    elif not args.accept_certificate:
        if not sys.stdin.isatty():
            raise CommandError(
                f"the server's CA fingerprint is {fp}; compare it with `minicloud node show` on the node, then "
                "re-run with --fingerprint " + fp
            )
        answer = input(f"CA fingerprint: {fp}\nDoes it match `minicloud node show` on the node? (yes/no) ")
        if answer.strip().lower() not in ("y", "yes"):
            raise CommandError("not trusted; nothing was saved")
    # 2. Talk to it for real, with the CA pinned, and check the token with what every principal may call.
    verified = Client(url=args.url, token=args.token, ca_pem=ca["pem"], timeout=15)
    me = None
    try:
        version = verified.version()
        if args.token:
            me = verified.whoami()
    except ApiError as exc:
        raise CommandError(f"the remote refused the token: {exc.problem.detail}") from None
    finally:
        verified.close()
    save_ca(args.name, ca["pem"])
    cfg.remotes[args.name] = Remote(name=args.name, url=args.url.rstrip("/"), token=args.token, ca_fingerprint=fp)
    if args.default or cfg.default is None:
        cfg.default = args.name
    save_config(cfg)
    if args.output == "table":
        print(f"Added remote {args.name} (node {version.node}, minicloud {version.version}, CA {fp})")
        if me is not None:
            print(f"The token is {describe_principal(me)}")
        else:
            print("No token given: only public endpoints will answer (add one with --token)")
    else:
        emit(
            {
                "name": args.name,
                "url": args.url,
                "ca_fingerprint": fp,
                "node": version.node,
                "principal": me.principal if me is not None else None,
                "whoami": me,
            },
            args.output,
        )
    return 0


def describe_principal(me: WhoAmI) -> str:
    """``user:alice (alice), member in default, API key ak-… expires …``: who a token is, in one line."""
    roles = ", ".join(f"{b.role} in {b.project}" if b.project else f"{b.role} cluster-wide" for b in me.bindings)
    cred = me.credential
    expiry = f"expires {cred.expires_at}" if cred.expires_at else "never expires"
    return (
        f"{me.principal}"
        + (f" ({me.name})" if me.name not in me.principal else "")
        + f", {roles or 'no roles yet'}; {'API key ' + cred.id if cred.id else cred.type}, {expiry}"
    )


def list_(args: argparse.Namespace) -> int:
    cfg = load_config()
    rows = [
        {"name": r.name, "url": r.url, "default": r.name == cfg.default, "ca_fingerprint": r.ca_fingerprint}
        for r in cfg.remotes.values()
    ]
    emit(rows, args.output, COLUMNS)
    return 0


def remove(args: argparse.Namespace) -> int:
    cfg = load_config()
    remote = cfg.remotes.pop(args.name, None)
    if remote is None:
        raise CommandError(f"no remote named {args.name}; see `minicloud remote list`")
    if cfg.default == args.name:
        cfg.default = None
    save_config(cfg)
    remote.ca_path().unlink(missing_ok=True)
    if args.output == "table":
        print(f"Removed remote {args.name}")
    return 0


def set_default(args: argparse.Namespace) -> int:
    cfg = load_config()
    if args.name not in cfg.remotes:
        raise CommandError(f"no remote named {args.name}; see `minicloud remote list`")
    cfg.default = args.name
    save_config(cfg)
    return 0
