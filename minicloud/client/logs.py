"""SDK for logs: ``client.logs.read(service=…, since=…)`` (every node's lines merged by time) and
``client.logs.follow(…)`` (then new lines as they come); ``instance=`` reads one instance's console as a project
member."""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import msgspec

from minicloud.model.logs import LogLine, LogsAnswer

if TYPE_CHECKING:
    from minicloud.client import Client


class NodeError(msgspec.Struct, kw_only=True):
    """A node that could not answer while following."""

    node: str
    error: str


class Logs:
    def __init__(self, client: Client) -> None:
        self._c = client

    @staticmethod
    def _query(**kw: Any) -> dict[str, Any]:
        return {k: (",".join(v) if isinstance(v, list | tuple) else v) for k, v in kw.items() if v is not None}

    def read(
        self,
        *,
        node: str | None = None,
        instance: str | None = None,
        service: str | list[str] | None = None,
        since: str | None = None,
        grep: str | None = None,
        limit: int | None = None,
    ) -> LogsAnswer:
        """The newest ``limit`` lines (default 1,000) of every node, merged by time."""
        query = self._query(node=node, instance=instance, service=service, since=since, grep=grep, limit=limit)
        return self._c.call("GET", "/v1/logs", LogsAnswer, query=query)

    def follow(
        self,
        *,
        node: str | None = None,
        instance: str | None = None,
        service: str | list[str] | None = None,
        since: str | None = None,
        grep: str | None = None,
        limit: int | None = None,
    ) -> Iterator[LogLine | NodeError]:
        """The newest ``limit`` lines, then each new line until the caller stops (or the connection ends)."""
        from minicloud.client import ApiError, Response, _problem

        query = self._query(
            node=node, instance=instance, service=service, since=since, grep=grep, limit=limit, follow="true"
        )
        if self._c.project:
            query["project"] = self._c.project
        conn = self._c._connection()
        headers = {"Accept": "application/x-ndjson"}
        if self._c.token:
            headers["Authorization"] = f"Bearer {self._c.token}"
        conn.request("GET", "/v1/logs?" + urllib.parse.urlencode(query), headers=headers)
        if conn.sock is not None:
            conn.sock.settimeout(None)  # a quiet log is no reason to give up
        resp = conn.getresponse()
        if resp.status >= 400:
            body = resp.read()
            raise ApiError(_problem(Response(status=resp.status, headers={}, body=body)))
        try:
            while raw := resp.readline():
                obj = msgspec.json.decode(raw)
                if "line" in obj:
                    yield msgspec.convert(obj, LogLine)
                elif "error" in obj:
                    yield msgspec.convert(obj, NodeError)
        finally:
            self._c.close()
