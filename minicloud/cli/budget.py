"""``minicloud budget create|list|show|delete``: monthly budgets with thresholds, notifications and enforcement
(docs/billing.md)."""

from __future__ import annotations

import argparse

from minicloud.cli.common import CommandError, client
from minicloud.cli.output import col, emit


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("budget", help="monthly budgets of the project")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("create", help="a monthly budget (admins)")
    v.add_argument("name")
    v.add_argument("--amount", required=True, help="per calendar month, e.g. 100")
    v.add_argument("--currency", help="ISO 4217 (default: billing.currency)")
    v.add_argument("--thresholds", default="50,80,100", help="percentages that notify (default: 50,80,100)")
    v.add_argument("--no-forecast", dest="forecast", action="store_false", help="thresholds on actual spend only")
    v.add_argument("--alarm", help="an alarm of the project whose webhooks receive the notifications")
    v.add_argument("--enforce", action="store_true", help="refuse new billable resources once the budget is spent")
    v.add_argument(
        "--stop-instances",
        action="store_true",
        help="also stop the project's running instances once it is spent (implies --enforce)",
    )
    v.add_argument("--description", default="")
    v.set_defaults(func=create)
    v = verbs.add_parser("list", help="budgets with this month's spend and forecast")
    v.set_defaults(func=list_budgets)
    v = verbs.add_parser("show", help="one budget and its notifications this month")
    v.add_argument("name")
    v.set_defaults(func=show)
    v = verbs.add_parser("delete", help="delete a budget (lifts its enforcement)")
    v.add_argument("name")
    v.set_defaults(func=delete)


_COLUMNS = [col("name", "name"), col("amount", "amount"), col("currency", "currency"), col("period", "period"),
            col("spent", "spent"), col("forecast", "forecast_spend"), col("crossed", "crossed"),
            col("enforce", "enforce"), col("exhausted", "exhausted")]  # fmt: skip


def create(args: argparse.Namespace) -> int:
    try:
        thresholds = [int(x) for x in args.thresholds.split(",") if x.strip()]
    except ValueError:
        raise CommandError(
            f"--thresholds: {args.thresholds!r} is not a list of percentages such as 50,80,100"
        ) from None
    budget = client(args).billing.create_budget(
        args.name, args.amount, currency=args.currency, thresholds=thresholds, forecast=args.forecast,
        alarm=args.alarm, enforce=args.enforce, stop_instances=args.stop_instances, description=args.description,
    )  # fmt: skip
    emit(budget if args.output != "table" else [budget], args.output, _COLUMNS)
    return 0


def list_budgets(args: argparse.Namespace) -> int:
    emit(client(args).billing.budgets(), args.output, _COLUMNS)
    return 0


def show(args: argparse.Namespace) -> int:
    budget = client(args).billing.budget(args.name)
    if args.output != "table":
        emit(budget, args.output)
        return 0
    emit([budget], "table", _COLUMNS)
    if budget.stopped:
        emit(budget.stopped, "table", [col("stopped instance", "name"), col("id", "instance_id"), col("at", "at")])
    if budget.notifications:
        emit(budget.notifications, "table", [col("crossed", "key"), col("at", "at"), col("spent", "spent"),
                                             col("forecast", "forecast"), col("webhooks", "deliveries")])  # fmt: skip
    return 0


def delete(args: argparse.Namespace) -> int:
    client(args).billing.delete_budget(args.name)
    return 0
