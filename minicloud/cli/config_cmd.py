"""``minicloud config validate|show``: check the agent's configuration the way the agent will load it."""

from __future__ import annotations

import argparse

from minicloud.cli.output import emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="check and show the agent configuration")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    for name, func, text in (
        (
            "validate",
            validate,
            "check the configuration file and environment; exit 1 with the reason if invalid",
        ),
        ("show", show, "print the effective configuration (defaults < file < environment)"),
    ):
        v = verbs.add_parser(name, help=text)
        v.add_argument(
            "--config",
            metavar="FILE",
            help="config file (default: $MINICLOUD_CONFIG or /etc/minicloud/minicloud.toml)",
        )
        v.set_defaults(func=func)


def validate(args: argparse.Namespace) -> int:
    from minicloud import config
    from minicloud.errors import ConfigError

    try:
        config.load(args.config)
    except ConfigError as exc:
        print(f"invalid: {exc.detail}")
        return 1
    print("configuration is valid")
    return 0


def show(args: argparse.Namespace) -> int:
    from minicloud import config

    emit(config.dump(config.load(args.config)), "yaml" if args.output == "table" else args.output)
    return 0
