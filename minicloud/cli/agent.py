"""``minicloud agent`` (the daemon) and ``minicloud init`` (first-time set-up of the local node)."""

from __future__ import annotations

import argparse
import os

from minicloud.cli.common import CommandError, client
from minicloud.cli.output import emit
from minicloud.client import ApiError

ADMIN_KEY = "admin"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="run the node daemon (normally started by systemd)")
    p.add_argument(
        "--config",
        metavar="FILE",
        help="config file (default: $MINICLOUD_CONFIG or /etc/minicloud/minicloud.toml)",
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="state directory (default: $MINICLOUD_DATA_DIR or /var/lib/minicloud)",
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="HTTPS address; '' disables it (default: $MINICLOUD_LISTEN or 0.0.0.0:8443)",
    )
    # `minicloud agent --socket PATH` and `minicloud --socket PATH agent` both work; a separate dest keeps the
    # subcommand's default from overwriting the top-level value.
    p.add_argument(
        "--socket",
        dest="agent_socket",
        metavar="PATH",
        help="the Unix socket to serve (default: $MINICLOUD_SOCKET or /run/minicloud/minicloud.sock)",
    )
    p.add_argument("--node-name", metavar="NAME", help="this node's name (default: the host name)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run_agent)

    p = sub.add_parser("init", help="initialise this node: create the first admin API key and print how to connect")
    p.set_defaults(func=init)


def agent_overrides(args: argparse.Namespace) -> dict[str, str | None]:
    """The configuration overrides the ``agent`` command line gives (None: not given, the layers below decide)."""
    socket = args.agent_socket or args.socket
    return {
        "agent.data_dir": args.data_dir and os.path.abspath(args.data_dir),
        "agent.socket": socket and os.path.abspath(socket),
        "agent.listen": args.listen,
        "agent.node_name": args.node_name,
        "agent.log_level": args.log_level,
    }


def run_agent(args: argparse.Namespace) -> int:
    try:
        from agent.daemon import run
    except ImportError as exc:  # `pip install minicloud` is the client only
        raise CommandError(
            f"the agent needs the node's dependencies ({exc.name} is missing): pip install 'minicloud[agent]', "
            "or install the node with scripts/install.sh"
        ) from None
    from minicloud import config, logs

    cfg = config.load(args.config, overrides=agent_overrides(args))
    # JSON lines on stdout (journald) and in DATA_DIR/logs/agent.log, which `minicloud logs` reads
    cfg.data_path.mkdir(parents=True, exist_ok=True, mode=0o700)  # before the log's directory: the data dir is 0700
    logs.setup(
        cfg.agent.log_level,
        file=cfg.data_path / "logs" / "agent.log",
        max_bytes=cfg.logs.max_bytes,
        backups=cfg.logs.backups,
    )
    run(cfg)
    return 0


def init(args: argparse.Namespace) -> int:
    c = client(args)
    if c.token is not None:
        raise CommandError("run `minicloud init` on the node itself, as root (it uses the local Unix socket)")
    version = c.version()
    try:
        existing = c.apikeys.get(ADMIN_KEY)
    except ApiError as exc:
        if exc.status != 404:
            raise
        existing = None
    if existing is not None:
        if args.output != "table":
            emit(
                {"initialised": False, "node": version.node, "ca_fingerprint": version.ca_fingerprint},
                args.output,
            )
            return 0
        print(f"Node {version.node} is already initialised (admin API key {existing.prefix}… exists).")
        print("Create more keys with `minicloud apikey create NAME`.")
        return 0
    key = c.apikeys.create(name=ADMIN_KEY, description="created by minicloud init")
    if args.output != "table":
        emit(
            {
                "initialised": True,
                "node": version.node,
                "ca_fingerprint": version.ca_fingerprint,
                "secret": key.secret,
            },
            args.output,
        )
        return 0
    print(f"Initialised node {version.node}.")
    print()
    print("Admin API key (shown only now; store it safely):")
    print(f"  {key.secret}")
    print()
    print(f"CA fingerprint: {version.ca_fingerprint}")
    print("From another machine:")
    print(
        f"  minicloud remote add {version.node} https://<this-host>:8443 --token <key> --fingerprint {version.ca_fingerprint}"
    )
    return 0
