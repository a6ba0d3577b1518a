"""The audit log: who did what, where, with which outcome — every mutating request and every denied one.

Audit entries are records of kind ``audit`` in the replicated store, so every node of a cluster sees the same log.
An allowed change writes its entry **in the same transaction** as the change itself: no change without its entry,
and no entry for a change that did not happen. Failed and denied requests write theirs afterwards. The log is
append-only: the store refuses to update or delete ``audit`` records (see :data:`APPEND_ONLY_KINDS`), except that
the retention leader loop (``minicloud.retention``) deletes entries older than ``retention.audit_days`` (:func:`expired`).

Ids are time-ordered (``au-<milliseconds as 12 hex digits><random>``), so listing in name order is listing in time
order and ``since`` is a lower bound on the name.

**Bounded size.** An entry copies at most :data:`MAX_PATH` characters of the request path and :data:`MAX_FIELD` of
every other text it takes from the request or the caller (method, source, principal, action, target values), so a
request with a 16 KB path still writes an entry of well under :data:`MAX_ENTRY_BYTES`; what is cut off ends in
``…(truncated)``.

**Refusals are aggregated.** Requests refused before any work is done (``401``: no or bad credentials; ``429``:
throttled) are not written one by one — a flood of them would cost one durable, replicated write each.
:class:`RefusalAggregator` counts them in memory per (source, minute, principal, action, status) and writes one entry
per group with its ``count``, once the minute is over.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass

from minicloud import errors, ids
from minicloud.iam.kinds import AUDIT, AuditSpec, audit_view
from minicloud.model import AuditEntry
from minicloud.state import Create, Record, Store, Txn
from minicloud.state.records import APPEND_ONLY_KINDS

KIND = AUDIT.name
assert KIND in APPEND_ONLY_KINDS
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: The most characters of the request path an entry keeps.
MAX_PATH = 512
#: The most characters of any other request-supplied text (method, source, principal, action, target values).
MAX_FIELD = 128
#: What one entry stays under, encoded (the path and fields above, plus fixed-size ids and times).
MAX_ENTRY_BYTES = 2048
_CUT = "…(truncated)"
#: ``since`` may reach back this far as a duration, and no earlier than :data:`EARLIEST` as a time.
MAX_SINCE_DAYS = 36500
EARLIEST = _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
LATEST = _dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=_dt.UTC)
SINCE_RANGE = (
    f"an RFC 3339 time from {EARLIEST:%Y-%m-%dT%H:%M:%SZ} to {LATEST:%Y-%m-%dT%H:%M:%SZ}, "
    f"or a duration back from now of at most {MAX_SINCE_DAYS}d (e.g. 90s, 15m, 2h, 7d)"
)


def clip(text: str, limit: int = MAX_FIELD) -> str:
    """``text`` cut to at most ``limit`` characters, marked ``…(truncated)`` when cut."""
    return text if len(text) <= limit else text[: limit - len(_CUT)] + _CUT


def new_id(at_ms: int | None = None) -> str:
    ms = int(time.time() * 1000) if at_ms is None else at_ms
    return f"au-{ms:012x}{os.urandom(5).hex()}"


def id_floor(moment: _dt.datetime) -> str:
    """The smallest id an entry made at or after ``moment`` can have."""
    return f"au-{int(moment.timestamp() * 1000):012x}"


def parse_since(value: str, now: _dt.datetime | None = None) -> _dt.datetime:
    """``since`` as an RFC 3339 time or a duration back from now (``90s``, ``15m``, ``2h``, ``7d``).

    ValueError (its message names :data:`SINCE_RANGE`) for anything malformed or out of range: a duration longer
    than :data:`MAX_SINCE_DAYS` days, or a time before 1970 or after 9999."""
    now = now or _dt.datetime.now(_dt.UTC)
    text = value.strip()
    m = _DURATION.match(text)
    if m:
        seconds = int(m[1]) * _UNITS[m[2]] if len(m[1]) <= 12 else math.inf
        if seconds > MAX_SINCE_DAYS * 86400:
            raise ValueError(f"since={value!r} reaches back too far; use {SINCE_RANGE}")
        moment = max(EARLIEST, now - _dt.timedelta(seconds=seconds))  # before 1970: the whole log
    else:
        try:
            moment = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"since={value!r} is not valid; use {SINCE_RANGE}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=_dt.UTC)
    try:
        in_range = EARLIEST <= moment <= LATEST
    except OverflowError:  # an offset that pushes the time past the calendar's ends
        in_range = False
    if not in_range:
        raise ValueError(f"since={value!r} is out of range; use {SINCE_RANGE}")
    return moment


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
    count: int = 1,
    at: float | None = None,
) -> Record:
    """A stamped audit record (``result``: ``allowed``, ``denied`` or ``failed``) of ``count`` requests (more than
    one only for aggregated refusals), made at ``at`` (seconds since the epoch; now by default). Request-supplied
    text is cut to :data:`MAX_PATH` / :data:`MAX_FIELD` characters."""
    stamp = ids.now() if at is None else ids.format_time(at)
    audit_id = new_id(None if at is None else int(at * 1000))
    principal = clip(principal)
    spec = AuditSpec(
        principal=principal,
        action=clip(action),
        method=clip(method, 16),
        path=clip(path, MAX_PATH),
        target={clip(k, 16): clip(str(v)) for k, v in list(target.items())[:4]},
        result=result,
        status=status,
        request_id=clip(request_id, 64),
        source=clip(source, 64),
        time=stamp,
        count=count,
    )
    labels = {"principal": principal, "result": result}
    return AUDIT.dump(AUDIT.new(project=project, name=audit_id, id=audit_id, spec=spec, labels=labels, stamp=stamp))


async def append(store: Store, entries: list[Record]) -> None:
    """Write audit entries that accompany no change (denied and failed requests, aggregated refusals) in one
    transaction. Entries of allowed changes are written by ``minicloud.core.write.commit`` with their change."""
    if entries:
        await store.commit(Txn([Create(e) for e in entries]))


def expired(record: Record, now: _dt.datetime, retention: _dt.timedelta) -> bool:
    """Pure: True if the audit entry ``record`` is older than ``retention`` at ``now`` (the retention loop deletes it).
    Entries are listed oldest first (time-ordered ids), so the expired ones are always a prefix of the listing."""
    return ids.parse_time(record.created_at) <= now - retention


@dataclass
class _Refusals:
    """One group of refused requests: what the first looked like, and how many there were."""

    at: float
    principal: str
    project: str
    action: str
    method: str
    path: str
    result: str
    status: int
    request_id: str
    count: int = 0


class RefusalAggregator:
    """Counts refused requests in memory and turns each (source, minute, principal, action, status) group into one
    audit entry with a ``count``, so a flood of bad tokens costs memory, not one durable write per request.

    Node-local and synchronous. Memory is bounded: at most ``max_groups`` groups are pending; beyond that the rest of
    the minute is counted under the source ``*`` (many sources). Entries are stamped with the group's first request
    (its time, method, path and request id); :meth:`drain` hands back the groups of minutes that are over (or all of
    them, at shut-down), which the caller writes in one transaction."""

    def __init__(self, max_groups: int = 10_000) -> None:
        if max_groups < 1:
            raise ValueError("max_groups must be at least 1")
        self.max_groups = max_groups
        self._groups: OrderedDict[tuple[str, int, str, str, int], _Refusals] = OrderedDict()

    def __len__(self) -> int:
        return len(self._groups)

    def note(
        self,
        *,
        source: str,
        principal: str,
        project: str,
        action: str,
        method: str,
        path: str,
        result: str,
        status: int,
        request_id: str,
        at: float | None = None,
    ) -> None:
        """Count one refused request (``at``: seconds since the epoch, now by default)."""
        t = time.time() if at is None else at
        minute = int(t // 60)
        key = (clip(source, 64), minute, clip(principal), clip(action), status)
        group = self._groups.get(key)
        if group is None and len(self._groups) >= self.max_groups:
            key = ("*", minute, "*", "*", status)
            group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Refusals(
                at=t,
                principal=key[2],
                project=project,
                action=key[3],
                method=clip(method, 16),
                path=clip(path, MAX_PATH),
                result=result,
                status=status,
                request_id=clip(request_id, 64),
            )
        group.count += 1

    def drain(self, now: float | None = None, *, everything: bool = False) -> list[Record]:
        """The audit entries of the groups whose minute is over at ``now`` (every group with ``everything``),
        removed from memory: the caller commits them (a failed commit loses them; the log says so)."""
        current = int((time.time() if now is None else now) // 60)
        done = [key for key in self._groups if everything or key[1] < current]
        records = []
        for key in done:
            g = self._groups.pop(key)
            records.append(
                entry(
                    principal=g.principal,
                    project=g.project,
                    action=g.action,
                    method=g.method,
                    path=g.path,
                    target={},
                    result=g.result,
                    status=g.status,
                    request_id=g.request_id,
                    source=key[0],
                    count=g.count,
                    at=g.at,
                )
            )
        return records


async def list_entries(
    store: Store,
    *,
    since: str | None = None,
    user: str | None = None,
    result: str | None = None,
    in_project: str | None = None,
    limit: int = 100,
    cursor: str | None = None,
) -> tuple[list[AuditEntry], str | None]:
    """One page of audit entries in time order and the cursor of the next (None: no more). ``since`` is
    :func:`parse_since`'s (422 naming the range otherwise); ``user`` a principal (``user:alice`` or ``alice`` means
    that user's id; ``local:root`` as is); ``in_project`` only that project's entries."""
    from minicloud.core import crud
    from minicloud.iam import principals

    after: tuple[str, str] | None = None
    if cursor:
        after = crud.decode_cursor(cursor)
    elif since:
        try:
            after = (id_floor(parse_since(since)), "")
        except ValueError as exc:  # malformed, or out of range (800000d): the message names the valid range
            raise errors.ValidationFailed(str(exc), invalid_params=[{"name": "since", "reason": str(exc)}]) from None
    labels = {}
    if user:  # entries name principals by id
        found = None if user.startswith("local:") else await principals.find_user(store, user)
        labels["principal"] = principals.ref_of(found) if found is not None else user
    if result:
        labels["result"] = result
    records = await store.list(AUDIT.name, project=in_project, labels=labels, after=after, limit=limit + 1)
    more = len(records) > limit
    records = records[:limit]
    nxt = crud.encode_cursor(records[-1].name, records[-1].id) if more else None
    return [audit_view(AUDIT.load(r)) for r in records], nxt
