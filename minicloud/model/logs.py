"""Log query request and response types (shared by server, SDK and CLI): ``GET /v1/logs`` and the node endpoint
``GET /v1/logs/node`` the merging node asks every node."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

Service = Literal["agent", "etcd", "tsdb", "ceph", "rgw", "dnsmasq", "console", "audit"]
#: RFC 3339, or a duration back from now (``90s``, ``15m``, ``2h``, ``7d``).
Since = Annotated[
    str, Meta(min_length=1, max_length=64, description="RFC 3339 time, or a duration back: 90s 15m 2h 7d")
]
Pattern = Annotated[
    str, Meta(min_length=1, max_length=512, description="a POSIX extended regular expression (grep -E)")
]


class LogLine(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One line of one node's logs."""

    #: RFC 3339 UTC with microseconds.
    time: str
    #: The same time as Unix seconds (what lines are merged by).
    ts: float
    node: str
    service: str
    line: str
    #: The file it came from, relative to the node's data directory (rotated copies end in ``.1``, ``.2`` …).
    source: str = ""
    #: The instance whose console it is.
    instance: str = ""
    #: The level the line gives (agent, etcd, tsdb), else empty.
    level: str = ""


class LogsQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``GET /v1/logs``: every node's lines merged by time, the newest ``limit``."""

    #: Only this node's lines.
    node: Annotated[str, Meta(max_length=253)] | None = None
    #: Only this instance's console (name or id, in ``?project=``): what a project member may read.
    instance: Annotated[str, Meta(max_length=253)] | None = None
    #: Only this service's lines (comma-separated for several).
    service: Annotated[str, Meta(max_length=200)] | None = None
    since: Since | None = None
    grep: Pattern | None = None
    limit: Annotated[int, Meta(ge=1, le=1_000_000)] = 1000
    #: Keep the response open and stream new lines (NDJSON) after the newest ``limit``.
    follow: bool = False


class NodeLogsQuery(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``GET /v1/logs/node``: this node's lines (what ``/v1/logs`` asks each node; node certificates or admins)."""

    service: Annotated[str, Meta(max_length=200)] | None = None
    #: Only the consoles of these instance ids (comma-separated), nothing else.
    instances: Annotated[str, Meta(max_length=1_000_000)] | None = None
    since: Since | None = None
    grep: Pattern | None = None
    limit: Annotated[int, Meta(ge=1, le=1_000_000)] = 1000
    follow: bool = False


class NodeAnswer(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How one node answered: ``ok``, or why its lines are missing."""

    node: str
    error: str = ""


class LogsAnswer(msgspec.Struct, kw_only=True):
    lines: list[LogLine]
    #: Each node asked and how it answered (a node that did not answer is named with its error).
    nodes: list[NodeAnswer] = []
    #: More lines matched than ``limit``: the oldest were left out.
    truncated: bool = False
