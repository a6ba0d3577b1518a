"""The audit log: who did what, where, with which outcome — every mutating request and every denied one.

Audit entries are records of kind ``audit`` in the replicated store, so every node of a cluster sees the same log.
An allowed change writes its entry **in the same transaction** as the change itself: no change without its entry,
and no entry for a change that did not happen. Failed and denied requests write theirs afterwards. The log is
append-only: the store refuses to update or delete ``audit`` records (see :data:`APPEND_ONLY_KINDS`), except that
the retention leader loop (``minicloud.retention``) deletes entries older than ``retention.audit_days`` (:func:`expired`).

Ids are time-ordered (``au-<milliseconds as 12 hex digits><random>``), so listing in name order is listing in time
order and ``since`` is a lower bound on the name.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import time

from minicloud import ids
from minicloud.state import Record
from minicloud.state.records import APPEND_ONLY_KINDS

KIND = "audit"
assert KIND in APPEND_ONLY_KINDS
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def new_id(at_ms: int | None = None) -> str:
    ms = int(time.time() * 1000) if at_ms is None else at_ms
    return f"au-{ms:012x}{os.urandom(5).hex()}"


def id_floor(moment: _dt.datetime) -> str:
    """The smallest id an entry made at or after ``moment`` can have."""
    return f"au-{int(moment.timestamp() * 1000):012x}"


def parse_since(value: str, now: _dt.datetime | None = None) -> _dt.datetime:
    """``since`` as an RFC 3339 time or a duration back from now (``90s``, ``15m``, ``2h``, ``7d``)."""
    now = now or _dt.datetime.now(_dt.UTC)
    m = _DURATION.match(value.strip())
    if m:
        return now - _dt.timedelta(seconds=int(m[1]) * _UNITS[m[2]])
    moment = _dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=_dt.UTC)


def entry(
    *,
    principal: str,
    project: str,
    action: str,
    method: str,
    path: str,
    target: dict[str, str],
    result: str,
    status: int,
    request_id: str,
    source: str,
) -> Record:
    """A stamped audit record (``result``: ``allowed``, ``denied`` or ``failed``)."""
    stamp = ids.now()
    audit_id = new_id()
    return Record(
        kind=KIND,
        id=audit_id,
        project=project,
        name=audit_id,
        labels={"principal": principal, "result": result},
        spec={
            "principal": principal,
            "action": action,
            "method": method,
            "path": path,
            "target": target,
            "result": result,
            "status": status,
            "request_id": request_id,
            "source": source,
            "time": stamp,
        },
        created_at=stamp,
        updated_at=stamp,
    )


def expired(record: Record, now: _dt.datetime, retention: _dt.timedelta) -> bool:
    """Pure: True if the audit entry ``record`` is older than ``retention`` at ``now`` (the retention loop deletes it).
    Entries are listed oldest first (time-ordered ids), so the expired ones are always a prefix of the listing."""
    return ids.parse_time(record.created_at) <= now - retention
