"""``minicloud cost report|export|recommendations``: cost reports with a forecast, the FOCUS 1.2 export and savings
recommendations (docs/billing.md)."""

from __future__ import annotations

import argparse

from minicloud.cli.common import client
from minicloud.cli.output import col, emit


def _project(v: argparse.ArgumentParser, every: bool = True) -> None:
    # SUPPRESS: without it the subcommand's default would overwrite a global `minicloud --project P cost ...`.
    v.add_argument("--project", metavar="P", default=argparse.SUPPRESS, help="the project (as the global --project)")
    if every:
        v.add_argument("--all", action="store_true", help="every project (admins)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cost", help="cost reports, forecast and the FOCUS export")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("report", help="charges grouped by service, resource, node or label, and the forecast")
    _project(v)
    v.add_argument("--group-by", default="service", metavar="G",
                   help="service | resource | project | node | label:KEY (default: service)")  # fmt: skip
    v.add_argument("--since", default="30d", help="30d, 12h or YYYY-MM-DD (default: 30d)")
    v.add_argument("--granularity", choices=["day", "month"], default="day")
    v.set_defaults(func=report)
    v = verbs.add_parser("export", help="the period's charges as a FOCUS 1.2 CSV on standard output")
    _project(v)
    v.add_argument("--format", choices=["focus"], default="focus")
    v.add_argument("--period", required=True, help="YYYY-MM")
    v.set_defaults(func=export)
    v = verbs.add_parser("recommendations", help="idle and oversized instances, unused volumes, snapshots, addresses")
    _project(v, every=False)
    v.add_argument("--days", type=int, default=7, help="days of metrics for the instance ones (default: 7)")
    v.add_argument("--snapshot-days", type=int, default=30, help="a snapshot older than this is reported (default 30)")
    v.add_argument("--idle-cpu", type=float, default=5.0, help="average CPU %% under which an instance is idle (5)")
    v.set_defaults(func=recommend)


def report(args: argparse.Namespace) -> int:
    r = client(args).billing.cost_report(
        group_by=args.group_by, since=args.since, granularity=args.granularity, all_projects=args.all
    )
    if args.output != "table":
        emit(r, args.output)
        return 0
    columns = [col("period", "period"), col(args.group_by, "group"), col("amount", "amount"),
               col("currency", "currency"), col("charges", "charges")]  # fmt: skip
    emit(r.rows, "table", columns)
    print("total since " + r.since + ": " + (", ".join(f"{v} {k}" for k, v in r.totals.items()) or "nothing charged"))
    f = r.forecast
    print(
        f"{f.period}: charged {', '.join(f'{v} {k}' for k, v in f.actual.items()) or '0'} up to {f.closed_until}; "
        f"forecast {', '.join(f'{v} {k}' for k, v in f.forecast.items()) or '0'}"
    )
    if r.unpriced:
        print(f"{r.unpriced} hourly charges had no price (0; see `minicloud price list`)")
    return 0


def export(args: argparse.Namespace) -> int:
    print(client(args).billing.focus(args.period, all_projects=args.all), end="")
    return 0


def recommend(args: argparse.Namespace) -> int:
    r = client(args).billing.recommendations(days=args.days, snapshot_days=args.snapshot_days, idle_cpu=args.idle_cpu)
    if args.output != "table":
        emit(r, args.output)
        return 0
    columns = [col("kind", "kind"), col("resource", "resource_name"), col("action", "action"),
               col("saving/month", "monthly_saving"), col("currency", "currency"), col("evidence", "evidence")]  # fmt: skip
    emit(r.items, "table", columns)
    print(
        "total: " + (", ".join(f"{v} {k}" for k, v in r.total_monthly_saving.items()) or "nothing to save") + " a month"
    )
    if r.metrics != "ok":
        print(f"metrics {r.metrics}: no idle or rightsizing recommendations")
    return 0
