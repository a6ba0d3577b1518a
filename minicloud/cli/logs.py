"""``minicloud logs [--node N] [--instance I] [--service S] [--since 1h] [--grep RE] [--follow]``: every node's
logs merged by time, through any node (administrators: every service; project members: their instances' consoles)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import msgspec

from minicloud.cli.common import client
from minicloud.model.logs import LogLine

SERVICES = ("agent", "etcd", "tsdb", "ceph", "rgw", "dnsmasq", "console", "audit")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "logs",
        help="every node's logs merged by time (agent, etcd, tsdb, ceph, rgw, dnsmasq, consoles, audit)",
        description="Every node's logs merged by time, through any node. Administrators read every service; "
        "project members read the consoles of their project's instances (--instance, or all of them).",
    )
    p.add_argument("--node", metavar="N", help="only this node's lines")
    p.add_argument("--instance", metavar="I", help="only this instance's serial console (name or id)")
    p.add_argument(
        "--service",
        metavar="S",
        help=f"only this service (comma-separated for several): {', '.join(SERVICES)}",
    )
    p.add_argument("--since", metavar="WHEN", help="an RFC 3339 time, or a duration back from now: 90s, 15m, 1h, 7d")
    p.add_argument("--grep", metavar="RE", help="only lines matching this extended regular expression (grep -E)")
    p.add_argument("--limit", type=int, metavar="N", help="the newest N lines (default 1000)")
    p.add_argument("-f", "--follow", action="store_true", help="then keep printing new lines (Ctrl-C stops)")
    p.set_defaults(func=run)


def _row(line: LogLine) -> str:
    what = f"{line.service}/{line.instance}" if line.instance else line.service
    return f"{line.time[:23]}Z {line.node} {what}: {line.line}"


def run(args: argparse.Namespace) -> int:
    c = client(args)
    query: dict[str, Any] = {
        "node": args.node,
        "instance": args.instance,
        "service": args.service,
        "since": args.since,
        "grep": args.grep,
        "limit": args.limit,
    }
    if args.follow:
        for item in c.logs.follow(**query):
            if isinstance(item, LogLine):
                if args.output == "table":
                    print(_row(item), flush=True)
                else:
                    print(json.dumps(msgspec.to_builtins(item), ensure_ascii=False), flush=True)
            else:
                print(f"Warning: node {item.node}: {item.error}", file=sys.stderr, flush=True)
        return 0
    answer = c.logs.read(**query)
    if args.output != "table":
        from minicloud.cli.output import emit

        emit(answer, args.output)
        return 0
    for line in answer.lines:
        print(_row(line))
    for node in answer.nodes:
        if node.error:
            print(f"Warning: node {node.node} did not answer: {node.error}", file=sys.stderr)
    if answer.truncated:
        print(f"(the newest {len(answer.lines)} lines; use --since or --limit for others)", file=sys.stderr)
    return 0
