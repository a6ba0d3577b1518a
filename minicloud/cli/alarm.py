"""``minicloud alarm create|list|show|delete|history``: alarms over your project's series (CloudWatch's model)."""

from __future__ import annotations

import argparse
from typing import Any

from minicloud.cli import generic
from minicloud.cli.common import CommandError, client
from minicloud.cli.keypair import parse_labels
from minicloud.cli.output import col, emit
from minicloud.model.alarms import STATES
from minicloud.observe.kinds import ALARM

#: ``--comparison``: the operator, or its name (no shell quoting needed).
COMPARISONS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<=", ">": ">", ">=": ">=", "<": "<", "<=": "<="}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("alarm", help="alarms over your project's series, with webhooks on state changes")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("create", help="create an alarm (starts INSUFFICIENT_DATA); prints its webhook secret once")
    v.add_argument("name")
    what = v.add_mutually_exclusive_group(required=True)
    what.add_argument("--query", metavar="PROMQL", help="a PromQL expression over your project's series")
    what.add_argument("--metric", metavar="NAME", help="a metric name (counters are read as per-second rates)")
    v.add_argument(
        "--dimension", action="append", default=[], metavar="LABEL=VALUE", help="with --metric: which series"
    )
    v.add_argument("--statistic", choices=["avg", "min", "max", "sum"], help="with --metric (default avg)")
    v.add_argument(
        "--comparison", required=True, choices=sorted(COMPARISONS), help="gt, ge, lt or le (or > >= < <=, quoted)"
    )
    v.add_argument("--threshold", type=float, required=True)
    v.add_argument("--period", type=int, metavar="SECONDS", help="seconds per evaluation period (default 60)")
    v.add_argument("--evaluation-periods", type=int, metavar="N", help="periods evaluated (default 1)")
    v.add_argument("--datapoints-to-alarm", type=int, metavar="M", help="breaching periods for ALARM (default N)")
    v.add_argument("--missing-data", choices=["missing", "notBreaching", "breaching", "ignore"])
    v.add_argument("--webhook", action="append", default=[], metavar="URL", help="POST state changes here")
    v.add_argument(
        "--on", default="ALARM,OK", metavar="STATES", help="states whose entry calls the webhooks (default ALARM,OK)"
    )
    v.add_argument("--description", default="")
    v.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    v.set_defaults(func=create)
    v = verbs.add_parser("history", help="an alarm's state changes and webhook deliveries, newest first")
    v.add_argument("name")
    v.add_argument("--limit", type=int, default=20, help="at most this many entries (default 20)")
    v.set_defaults(func=history)
    generic.add_verbs(verbs, ALARM, lambda c: c.alarms)


def create(args: argparse.Namespace) -> int:
    on = [s.strip() for s in args.on.split(",") if s.strip()]
    for state in on:
        if state not in STATES:
            raise CommandError(f"--on {state!r}: use one or more of {', '.join(STATES)}, comma-separated")
    dimensions = {}
    for item in args.dimension:
        key, sep, value = item.partition("=")
        if not sep:
            raise CommandError(f"--dimension {item!r} must be LABEL=VALUE")
        dimensions[key] = value
    if dimensions and not args.metric:
        raise CommandError("--dimension goes with --metric (with --query, write the matchers into the PromQL)")
    created = client(args).alarms.create(
        name=args.name,
        query=args.query,
        metric=args.metric,
        dimensions=dimensions or None,
        statistic=args.statistic,
        comparison=COMPARISONS[args.comparison],
        threshold=args.threshold,
        period=args.period,
        evaluation_periods=args.evaluation_periods,
        datapoints_to_alarm=args.datapoints_to_alarm,
        missing_data=args.missing_data,
        actions=[{"type": "webhook", "url": url, "on": on} for url in args.webhook] or None,
        description=args.description,
        labels=parse_labels(args.label) or None,
    )
    emit(created, args.output)
    if args.output == "table":
        print("\nThe webhook secret (HMAC-SHA256 key of X-Minicloud-Signature) is shown only now; keep it.")
    return 0


def history(args: argparse.Namespace) -> int:
    entries = client(args).alarms.history(args.name, limit=args.limit)
    columns: list[tuple[str, Any]] = [col("time", "at"), col("type", "type"), col("what", "summary")]
    emit(entries, args.output, columns)
    return 0
