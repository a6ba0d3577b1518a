"""``minicloud policy create auto-stop|list|show|delete``: stop idle instances by label selector (docs/billing.md)."""

from __future__ import annotations

import argparse
import re

from minicloud.cli.common import CommandError, client
from minicloud.cli.output import col, emit

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> int:
    m = re.fullmatch(r"([0-9]{1,6})([smhd]?)", text)
    if not m:
        raise CommandError(f"--idle: {text!r} is not a duration such as 90m, 2h or 1d")
    return int(m.group(1)) * _UNITS[m.group(2) or "s"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="auto-stop policies for idle instances")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("create", help="create a policy (auto-stop: stop idle instances of a label selector)")
    v.add_argument("type", choices=["auto-stop"])
    v.add_argument("--selector", required=True, help="label:key=value[,key=value]")
    v.add_argument("--idle", required=True, help="how long an instance must be idle: 2h, 90m, 1d (at least 10m)")
    v.add_argument("--name", help="the policy's name (default: auto-stop-<key>-<value>)")
    v.add_argument("--cpu", type=float, default=5.0, help="idle means CPU under this %% of its vCPUs (default 5)")
    v.add_argument("--alarm", help="an alarm of the project whose webhooks are told of each stop")
    v.add_argument("--dry-run", action="store_true", help="store nothing; show what it would stop now")
    v.add_argument("--description", default="")
    v.set_defaults(func=create)
    v = verbs.add_parser("list", help="the project's policies")
    v.set_defaults(func=list_policies)
    v = verbs.add_parser("show", help="one policy and the instances it stopped")
    v.add_argument("name")
    v.set_defaults(func=show)
    v = verbs.add_parser("delete", help="delete a policy")
    v.add_argument("name")
    v.set_defaults(func=delete)


_COLUMNS = [col("name", "name"), col("type", "type"), col("selector", "selector"), col("idle s", "idle"),
            col("cpu %", "cpu_percent"), col("checked", "checked_at"), col("error", "last_error")]  # fmt: skip
_ACTIONS = [col("instance", "name"), col("at", "at"), col("max cpu %", "max_cpu_percent"), col("outcome", "outcome")]


def _default_name(selector: str) -> str:
    text = re.sub(r"[^a-z0-9-]+", "-", selector.removeprefix("label:").lower()).strip("-")
    return ("auto-stop-" + text)[:63].rstrip("-")


def create(args: argparse.Namespace) -> int:
    policy = client(args).billing.create_policy(
        args.name or _default_name(args.selector), selector=args.selector, idle=duration(args.idle),
        cpu_percent=args.cpu, alarm=args.alarm, description=args.description, dry_run=args.dry_run,
    )  # fmt: skip
    if args.output != "table":
        emit(policy, args.output)
    elif args.dry_run:
        print(f"dry run of {policy.name}: {len(policy.actions)} instances would be stopped now")
        emit(policy.actions, "table", _ACTIONS)
    else:
        emit([policy], "table", _COLUMNS)
    return 0


def list_policies(args: argparse.Namespace) -> int:
    emit(client(args).billing.policies(), args.output, _COLUMNS)
    return 0


def show(args: argparse.Namespace) -> int:
    policy = client(args).billing.policy(args.name)
    if args.output != "table":
        emit(policy, args.output)
        return 0
    emit([policy], "table", _COLUMNS)
    emit(policy.actions, "table", _ACTIONS)
    return 0


def delete(args: argparse.Namespace) -> int:
    client(args).billing.delete_policy(args.name)
    return 0
