"""``minicloud``: the daemon (``minicloud agent``) and the shell client (``minicloud <noun> <verb> ...``).

Each noun lives in its own module under :mod:`minicloud.cli` with a ``register(subparsers)`` function; the client
commands use only the SDK (:mod:`minicloud.client`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from minicloud import __version__
from minicloud.cli import (
    accesskey,
    admin,
    agent,
    alarm,
    apikey,
    audit,
    backup,
    billing,
    bucket,
    budget,
    cluster,
    completion,
    config_cmd,
    cost,
    floating_ip,
    gpu,
    image,
    instance,
    instance_type,
    invoice,
    keypair,
    login,
    logs,
    metrics,
    network,
    node,
    operation,
    policy,
    pool,
    price,
    project,
    remote,
    router,
    s3,
    security_group,
    server_group,
    snapshot,
    storage,
    subnet,
    user,
    volume,
    whoami,
)
from minicloud.cli.common import CommandError, fail
from minicloud.client import ApiError, ConnectError
from minicloud.errors import MinicloudError

NOUNS = [
    agent,
    config_cmd,
    node,
    cluster,
    project,
    user,
    keypair,
    image,
    instance_type,
    instance,
    network,
    subnet,
    security_group,
    server_group,
    router,
    floating_ip,
    gpu,
    storage,
    pool,
    volume,
    snapshot,
    backup,
    metrics,
    alarm,
    logs,
    price,
    invoice,
    billing,
    budget,
    cost,
    policy,
    operation,
    apikey,
    accesskey,
    bucket,
    s3,
    audit,
    remote,
    whoami,
    login,
    admin,
    completion,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minicloud",
        description="minicloud: a small cloud for your own machines. Run `minicloud agent` on every node; "
        "use the other commands to manage it.",
    )
    parser.add_argument("--version", action="version", version=f"minicloud {__version__}")
    target = parser.add_mutually_exclusive_group()
    target.add_argument(
        "--socket",
        metavar="PATH",
        help="the agent's Unix socket (default: $MINICLOUD_SOCKET or /run/minicloud/minicloud.sock)",
    )
    target.add_argument("--remote", metavar="NAME", help="talk to a remote added with `minicloud remote add`")
    parser.add_argument(
        "--project", metavar="NAME", help="act in this project (default: $MINICLOUD_PROJECT or 'default')"
    )
    parser.add_argument(
        "-o",
        "--output",
        choices=["table", "json", "yaml"],
        default="table",
        help="output format (default: table)",
    )
    sub = parser.add_subparsers(dest="noun", metavar="<noun>", required=True)
    for module in NOUNS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ApiError as exc:
        p = exc.problem
        lines = [f"Error: {p.detail}"]
        for param in p.invalid_params:
            lines.append(f"  {param.get('name', '?')}: {param.get('reason', '')}")
        if p.request_id and p.status >= 500:
            lines.append(f"  (request id {p.request_id})")
        print("\n".join(lines), file=sys.stderr)
        return 1
    except ConnectError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        return fail(str(exc), exc.code)
    except MinicloudError as exc:  # e.g. a configuration the local commands (agent, config) cannot load
        return fail(str(exc))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `minicloud ... | head`: stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
