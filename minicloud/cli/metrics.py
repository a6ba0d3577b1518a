"""``minicloud metrics show instance NAME`` (a small table of one instance's usage over time) and ``minicloud
metrics query PROMQL`` (any PromQL over your project's series; ``--cluster`` for administrators)."""

from __future__ import annotations

import argparse
import datetime as _dt
import time
from typing import Any

from minicloud.cli.common import CommandError, client
from minicloud.cli.output import emit, table
from minicloud.observe.names import INSTANCE_VIEWS

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def _seconds(text: str) -> int:
    unit = text[-1:] if text[-1:] in _UNITS else "s"
    number = text[:-1] if text[-1:] in _UNITS else text
    try:
        value = int(float(number) * _UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a duration such as 30m, 1h or 2d") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be positive")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("metrics", help="usage series of your instances (and, for administrators, nodes and the API)")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser("show", help="a small table of one resource's usage over time")
    v.add_argument("kind", choices=["instance"], help="what to show")
    v.add_argument("name", help="its name or id")
    v.add_argument("--since", type=_seconds, default=3600, metavar="DURATION", help="how far back (default 1h)")
    v.add_argument("--metric", choices=sorted(INSTANCE_VIEWS), default="cpu", help="which figures (default cpu)")
    v.add_argument("--points", type=int, default=12, help="rows in the table (default 12)")
    v.set_defaults(func=show)
    v = verbs.add_parser("query", help="evaluate PromQL over your project's series")
    v.add_argument("promql", help="e.g. 'rate(minicloud_instance_cpu_seconds_total{name=\"vm1\"}[5m])'")
    v.add_argument("--time", help="evaluate at this time (Unix seconds, RFC 3339, -5m; default now)")
    v.add_argument("--since", type=_seconds, metavar="DURATION", help="a range query over the last DURATION")
    v.add_argument("--step", help="the range query's resolution (e.g. 30s, 5m)")
    v.add_argument("--cluster", action="store_true", help="every series, nodes and API included (administrators)")
    v.set_defaults(func=query)


def _when(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _number(value: str) -> str:
    try:
        f = float(value)
    except ValueError:
        return value
    return f"{f:.0f}" if abs(f) >= 1000 else f"{f:.3g}"


def show(args: argparse.Namespace) -> int:
    c = client(args)
    inst = c.instances.get(args.name)
    step = max(15, args.since // max(1, args.points))
    window = f"{max(step, 60)}s"  # a rate needs a few scrapes in its window
    selector = f'{{instance_id="{inst.id}"}}'
    rows: dict[float, dict[str, Any]] = {}
    columns = INSTANCE_VIEWS[args.metric]
    for title, promql in columns:
        expr = promql.replace("{sel}", selector).replace("{w}", window)
        answer = c.metrics.query_range(expr, start=f"-{args.since}s", step=f"{step}s")
        for series in answer.result or []:
            for t, v in series.get("values", []):
                rows.setdefault(float(t), {"time": _when(float(t))})[title] = _number(v)
    items = [rows[t] for t in sorted(rows)]
    if args.output != "table":
        emit({"instance": inst.name, "id": inst.id, "metric": args.metric, "step": step, "rows": items}, args.output)
        return 0
    if not items:
        print(f"no {args.metric} figures for {inst.name} in the last {args.since} s (stopped, or not scraped yet)")
        return 0
    table(items, [("time", lambda r: r["time"])] + [(t, lambda r, t=t: r.get(t, "")) for t, _ in columns])
    return 0


def query(args: argparse.Namespace) -> int:
    c = client(args)
    scope = "cluster" if args.cluster else None
    if args.since is not None:
        answer = c.metrics.query_range(args.promql, start=f"-{args.since}s", step=args.step, scope=scope)
    elif args.step is not None:
        raise CommandError("--step needs --since (a range query)")
    else:
        answer = c.metrics.query(args.promql, time=args.time, scope=scope)
    if args.output != "table":
        emit(answer, args.output)
        return 0
    if answer.result_type in ("scalar", "string"):
        print(_number(str(answer.result[1])))
        return 0
    items = []
    for series in answer.result or []:
        labels = series.get("metric", {})
        name = labels.get("__name__", "")
        shown = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
        if "value" in series:
            t, v = series["value"]
        else:
            t, v = series["values"][-1] if series.get("values") else (time.time(), "")
        points = len(series.get("values", [])) or 1
        items.append({"series": f"{name}{{{shown}}}", "value": _number(v), "at": _when(float(t)), "points": points})
    if not items:
        print("no series")
        return 0
    cols = [("series", lambda r: r["series"]), ("value", lambda r: r["value"]), ("at", lambda r: r["at"])]
    if args.since is not None:
        cols.append(("points", lambda r: str(r["points"])))
    table(items, cols)
    return 0
