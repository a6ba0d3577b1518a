"""``minicloud metrics show instance NAME`` (a small table of one instance's usage over time), ``minicloud
metrics query PROMQL`` (any PromQL over your project's series; ``--cluster`` for administrators) and ``minicloud top``
(live per-instance usage of your project, on one node or the cluster; ``--cluster`` for every project)."""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from typing import Any

from minicloud.cli.common import CommandError, client
from minicloud.cli.output import emit, table
from minicloud.observe.names import INSTANCE_VIEWS, TOP_COLUMNS, TOP_STATE

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

    t = sub.add_parser("top", help="live per-instance usage (CPU, memory, disk, network) on a node or the cluster")
    t.add_argument("--node", help="only the instances on this node (default: every node)")
    t.add_argument("--cluster", action="store_true", help="every project's instances (administrators)")
    t.add_argument("--sort", choices=["cpu", "memory", "disk", "net", "name"], default="cpu", help="(default cpu)")
    t.add_argument("--limit", type=int, default=0, help="show the first N rows (default all)")
    t.add_argument("--interval", type=_seconds, default=5, metavar="DURATION", help="refresh every (default 5s)")
    t.add_argument("--window", type=_seconds, default=60, metavar="DURATION", help="rate window (default 1m)")
    t.add_argument("--once", action="store_true", help="print once and exit (also with -o json|yaml)")
    t.set_defaults(func=top)


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


_SORT = {
    "cpu": ("cpu %",),
    "memory": ("mem MiB",),
    "disk": ("disk r B/s", "disk w B/s"),
    "net": ("net rx B/s", "net tx B/s"),
}


def top_rows(state: list[dict[str, Any]], columns: dict[str, list[dict[str, Any]]], sort: str) -> list[dict[str, Any]]:
    """One row per instance from instant answers (pure): ``state`` names the instances (the state series: labels
    and state), ``columns`` maps a column title to its answer (one series per ``instance_id``). Sorted by ``sort``,
    largest first (``name``: by project and name)."""
    rows: dict[str, dict[str, Any]] = {}
    for series in state:
        m = series.get("metric", {})
        iid = m.get("instance_id")
        if iid:
            rows[iid] = {"instance_id": iid, "name": m.get("name", ""), "project": m.get("project", ""),
                         "node": m.get("node", ""), "state": m.get("state", "")}  # fmt: skip
    for title, answer in columns.items():
        for series in answer:
            iid = series.get("metric", {}).get("instance_id")
            if iid in rows:
                try:
                    rows[iid][title] = float(series["value"][1])
                except (KeyError, IndexError, TypeError, ValueError):
                    continue
    items = list(rows.values())
    if sort == "name":
        return sorted(items, key=lambda r: (r["project"], r["name"], r["instance_id"]))
    keys = _SORT[sort]
    return sorted(items, key=lambda r: (-sum(r.get(k, 0.0) for k in keys), r["project"], r["name"]))


def _top_once(args: argparse.Namespace, c: Any) -> list[dict[str, Any]]:
    scope = "cluster" if args.cluster else None
    sel = '{node="' + args.node.replace("\\", "\\\\").replace('"', '\\"') + '"}' if args.node else ""
    window = f"{args.window}s"
    state = c.metrics.query(TOP_STATE.replace("{sel}", sel), scope=scope).result or []
    answers = {}
    for title, promql in TOP_COLUMNS:
        expr = promql.replace("{sel}", sel).replace("{w}", window)
        answers[title] = c.metrics.query(expr, scope=scope).result or []
    rows = top_rows(state, answers, args.sort)
    return rows[: args.limit] if args.limit > 0 else rows


def _top_table(rows: list[dict[str, Any]], cluster: bool) -> None:
    cols: list[tuple[str, Any]] = [("name", lambda r: r["name"])]
    if cluster:
        cols.append(("project", lambda r: r["project"]))
    cols += [("node", lambda r: r["node"]), ("state", lambda r: r["state"])]
    cols += [(t, lambda r, t=t: _number(str(r[t])) if t in r else "-") for t, _ in TOP_COLUMNS]
    table(rows, cols)


def top(args: argparse.Namespace) -> int:
    c = client(args)
    if args.output != "table" or args.once:
        rows = _top_once(args, c)
        if args.output != "table":
            emit(rows, args.output)
        elif rows:
            _top_table(rows, args.cluster)
        else:
            print("no instances with figures (none running, or not scraped yet)")
        return 0
    live = sys.stdout.isatty()
    try:
        while True:
            rows = _top_once(args, c)
            if live:
                sys.stdout.write("\x1b[H\x1b[2J")
            where = f"node {args.node}" if args.node else "all nodes"
            print(f"minicloud top: {len(rows)} instances, {where}, {_when(time.time())} UTC (Ctrl-C to stop)")
            if rows:
                _top_table(rows, args.cluster)
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return 0
