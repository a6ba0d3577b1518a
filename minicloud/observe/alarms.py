"""Alarms (CloudWatch's model): the pure state machine, the webhook signature and payload, and the services behind
``/v1/alarms`` (create with its checks, the history). The services leader evaluates them
(:mod:`minicloud.observe.alarm_loop`).

Evaluation, every ``alarms.interval`` seconds: a range query of the alarm's expression over the last N periods
(step = ``period``), through the same enforced query service as the API (the project's id as ``extra_label``), gives
one datapoint per period; a period with several series takes the worst one (the highest for ``>``/``>=``, the
lowest for ``<``/``<=``: the alarm breaches when any series does). Then, with M = ``datapoints_to_alarm``:

- ``breaching``: a period without data counts as breaching; ``notBreaching``: as not breaching. ALARM when at least M
  periods breach, else OK.
- ``missing`` and ``ignore``: periods without data are left out. ALARM when at least M of those with data breach; OK
  when even counting every period without data as breaching would not make M; otherwise the state stays (the data
  cannot decide). With no data at all, ``missing`` goes to INSUFFICIENT_DATA and ``ignore`` keeps the state.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import itertools
import json
import math
import secrets
import socket
from collections.abc import Sequence
from typing import Any

import msgspec

from minicloud import errors, ids
from minicloud.compute import image_download
from minicloud.compute.url_policy import AddressRefused, UrlPolicy, normal_host
from minicloud.core import crud
from minicloud.core.context import Context, Sealer
from minicloud.core.kinds import Obj
from minicloud.core.write import Written
from minicloud.model.alarms import AlarmCreate, AlarmCreated, AlarmHistoryEntry, AlarmHistoryPage
from minicloud.observe import names
from minicloud.observe.kinds import ALARM, ALARM_HISTORY, AlarmHistorySpec, AlarmSpec, AlarmStatus
from minicloud.observe.query import ProjectScope, QueryService
from minicloud.observe.scope import project_scope
from minicloud.state import Store

OK, ALARM_STATE, INSUFFICIENT = "OK", "ALARM", "INSUFFICIENT_DATA"
SIGNATURE_HEADER = "X-Minicloud-Signature"
DELIVERY_HEADER = "X-Minicloud-Delivery"
#: How long the name of a webhook URL may take to resolve at create (a name that does not resolve is accepted:
#: its deliveries fail, visibly).
RESOLVE_TIMEOUT = 5.0


# -- the state machine (pure) --------------------------------------------------------------------------------------
def breaches(value: float, comparison: str, threshold: float) -> bool:
    if comparison == ">":
        return value > threshold
    if comparison == ">=":
        return value >= threshold
    if comparison == "<":
        return value < threshold
    if comparison == "<=":
        return value <= threshold
    raise ValueError(f"unknown comparison {comparison!r}")


def datapoints(
    series: Sequence[dict[str, Any]], *, end: float, period: float, n: int, comparison: str
) -> list[float | None]:
    """One value per period, oldest first (None: no data), from a range answer's series (``values``: ``[[t, "v"],
    …]``). A sample at ``t`` belongs to the period ``floor((end - t) / period)`` back from the newest; where several
    series have a value, the worst for ``comparison`` is kept. NaN is no data."""
    out: list[float | None] = [None] * n
    worst = max if comparison in (">", ">=") else min
    for s in series:
        for t, v in s.get("values", []) or ([s["value"]] if "value" in s else []):
            try:
                value = float(v)
            except (TypeError, ValueError):
                continue
            if math.isnan(value):
                continue
            back = math.floor((end - float(t)) / period + 1e-9)
            slot = n - 1 - back
            if 0 <= slot < n:
                current = out[slot]
                out[slot] = value if current is None else worst(current, value)
    return out


def evaluate(
    points: Sequence[float | None], *, comparison: str, threshold: float, m: int, missing: str, current: str
) -> tuple[str, str]:
    """The state for ``points`` (oldest first) and why, in words (see the module docstring)."""
    n = len(points)
    present = [p for p in points if p is not None]
    absent = n - len(present)
    breaching = sum(1 for p in present if breaches(p, comparison, threshold))
    rule = f"{comparison} {threshold:g}"
    if missing in ("breaching", "notBreaching"):
        counted = breaching + (absent if missing == "breaching" else 0)
        words = f"{counted} of the last {n} periods breached {rule} ({absent} without data, counted as {missing})"
        return (ALARM_STATE if counted >= m else OK), f"{words}; {m} make an alarm"
    if not present:
        if missing == "ignore":
            return current, f"no data in the last {n} periods (ignored: the state stays)"
        return INSUFFICIENT, f"no data in the last {n} periods"
    words = f"{breaching} of the {len(present)} periods with data breached {rule} ({absent} of {n} without data)"
    if breaching >= m:
        return ALARM_STATE, f"{words}; {m} make an alarm"
    if breaching + absent < m:
        return OK, f"{words}; {m} make an alarm"
    return current, f"{words}: not enough data to decide, the state stays"


def backoff(attempts: int, base: float, cap: float) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: ``base``, doubling, at most ``cap``."""
    return float(min(cap, base * (2 ** max(0, attempts - 1))))


# -- webhooks (pure) -----------------------------------------------------------------------------------------------
def sign(secret: bytes, body: bytes) -> str:
    """The ``X-Minicloud-Signature`` value: ``sha256=`` and the hex HMAC-SHA256 of the body under the secret."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, signature: str) -> bool:
    """What a receiver does: recompute the signature and compare in constant time."""
    return hmac.compare_digest(sign(secret, body), signature)


def payload(
    alarm: Obj[AlarmSpec, AlarmStatus],
    *,
    delivery_id: str,
    transition: str,
    from_state: str,
    to_state: str,
    reason: str,
    points: Sequence[float | None],
    at: str,
) -> str:
    """The JSON body of a webhook delivery (fixed when the transition commits: every attempt sends these bytes)."""
    body = {
        "version": 1,
        "delivery_id": delivery_id,
        "transition": transition,
        "alarm": {"id": alarm.id, "name": alarm.name, "project": alarm.project, "project_id": alarm.spec.project_id},
        "from": from_state,
        "to": to_state,
        "reason": reason,
        "at": at,
        "expression": alarm.spec.expression,
        "comparison": alarm.spec.comparison,
        "threshold": alarm.spec.threshold,
        "datapoints": list(points),
    }
    return json.dumps(body, separators=(",", ":"), sort_keys=True)


# -- expressions -------------------------------------------------------------------------------------------------
def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def metric_expression(metric: str, dimensions: dict[str, str], statistic: str, period: int) -> str:
    """The PromQL of a named metric: counters (``_total``, or declared as such) as per-second rates over the period,
    gauges through ``<statistic>_over_time``; then ``<statistic>`` across the matching series."""
    selector = metric + ("{" + ",".join(f"{k}={_quote(v)}" for k, v in sorted(dimensions.items())) + "}")
    declared = names.BY_NAME.get(metric)
    counter = declared.type == "counter" if declared is not None else metric.endswith("_total")
    inner = f"rate({selector}[{period}s])" if counter else f"{statistic}_over_time({selector}[{period}s])"
    return f"{statistic}({inner})"


_SEQUENCE = itertools.count()


def history_name(alarm_id: str, at: float) -> str:
    """``<alarm id>.<inverted time>``: one alarm's entries are one range of the name index, newest first (within one
    microsecond, the later written first: a per-process sequence breaks the tie; a random tail keeps names unique)."""
    us = int(at * 1_000_000)
    seq = next(_SEQUENCE) % 1_000_000
    return f"{alarm_id}.{10**17 - us:017d}{999_999 - seq:06d}{secrets.token_hex(2)}"


def history_record(project: str, spec: AlarmHistorySpec, at: float) -> Any:
    entry = ALARM_HISTORY.new(project=project, name=history_name(spec.alarm_id, at), spec=spec, stamp=spec.at)
    return ALARM_HISTORY.dump(entry)


# -- services ------------------------------------------------------------------------------------------------------
async def check_webhook_url(url: str, policy: UrlPolicy) -> None:
    """422 unless ``url`` is http(s), carries no credentials, and its host (an address, or every address its name
    resolves to now) passes ``policy`` (``alarms.webhook_allow``; the rule image URLs follow). Deliveries check again
    at connect time (DNS may change)."""

    def refused(reason: str) -> errors.ValidationFailed:
        return errors.ValidationFailed(
            f"webhook URL {url[:200]!r}: {reason}", invalid_params=[{"name": "actions.url", "reason": reason}]
        )

    try:
        parsed = image_download.check_url(url, policy)
    except AddressRefused as exc:
        raise refused(_policy_words(exc.detail)) from None
    except errors.ValidationFailed:
        raise refused("not an http:// or https:// URL with a host (and no user name or password)") from None
    host = normal_host(parsed.host or "")
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return  # an address: check_url judged it
    except ValueError:
        pass
    if policy.host_allowed(host):
        return
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, parsed.port or 443, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT
        )
    except (OSError, TimeoutError):
        return  # does not resolve now: accepted, and each delivery checks again
    for info in infos:
        reason = policy.refusal(host, str(info[4][0]))
        if reason is not None:
            raise refused(
                f"{host} resolves to {reason} ({info[4][0]}), which alarms do not send to; use a public URL, or "
                "ask the operator to allow it in alarms.webhook_allow"
            )


def _policy_words(detail: str) -> str:
    return (
        detail.replace("the image URL leads to", "it leads to")
        .replace("which the node does not download from", "which alarms do not send to")
        .replace("compute.image_url_allow", "alarms.webhook_allow")
    )


async def validate_expression(service: QueryService, expression: str, scope: ProjectScope, body: Any) -> None:
    """The TSDB's parser checks the expression (422 with its message), over the same window evaluation uses (a
    window past the query limits is a 422 too)."""
    span = (body.evaluation_periods - 1) * body.period
    await service.query_range(expression, start=f"-{span}s", end="now", step=f"{body.period}s", project=scope)


async def create_alarm(
    ctx: Context,
    store: Store,
    body: AlarmCreate,
    *,
    service: QueryService | None,
    sealer: Sealer,
    policy: UrlPolicy,
    quota: int,
) -> Written:
    """Create an alarm in ``ctx``'s project (INSUFFICIENT_DATA until evaluated). Answers with the one-time
    ``webhook_secret``."""
    if (body.query is None) == (body.metric is None):
        raise errors.ValidationFailed(
            "give exactly one of query (a PromQL expression) or metric (a metric name, with statistic and period)",
            invalid_params=[{"name": "query", "reason": "exactly one of query or metric"}],
        )
    if body.query is not None and (body.dimensions or body.statistic != "avg"):
        raise errors.ValidationFailed(
            "dimensions and statistic go with metric, not with query (write them into the PromQL)",
            invalid_params=[{"name": "dimensions", "reason": "only with metric"}],
        )
    m = body.datapoints_to_alarm if body.datapoints_to_alarm is not None else body.evaluation_periods
    if m > body.evaluation_periods:
        raise errors.ValidationFailed(
            f"datapoints_to_alarm ({m}) cannot exceed evaluation_periods ({body.evaluation_periods})",
            invalid_params=[{"name": "datapoints_to_alarm", "reason": "more than evaluation_periods"}],
        )
    for action in body.actions:
        await check_webhook_url(action.url, policy)
    if service is None:
        raise errors.Unavailable(
            "this node runs no metrics database to check the alarm's expression with; ask a voting node"
        )
    await crud.refuse_beyond(store, ALARM, ctx.project, quota, "alarms.quota_per_project")
    scope = await project_scope(store, ctx.project)
    expression = body.query or metric_expression(body.metric or "", body.dimensions, body.statistic, body.period)
    await validate_expression(service, expression, scope, body)
    alarm_id = ids.new_id(ALARM.prefix)
    secret = secrets.token_urlsafe(32)
    spec = AlarmSpec(
        comparison=body.comparison,
        threshold=body.threshold,
        query=body.query,
        metric=body.metric,
        dimensions=dict(body.dimensions) if body.metric else {},
        statistic=body.statistic,
        period=body.period,
        evaluation_periods=body.evaluation_periods,
        datapoints_to_alarm=m,
        missing_data=body.missing_data,
        actions=list(body.actions),
        expression=expression,
        project_id=scope.id,
        sealed_secret=sealer.encrypt(secret.encode(), alarm_id.encode()),
        description=body.description,
    )
    stamp = ctx.clock()
    obj = ALARM.new(
        project=ctx.project, name=body.name, spec=spec, labels=body.labels, id=alarm_id, stamp=stamp,
        status=AlarmStatus(state_updated_at=stamp),
    )  # fmt: skip

    def respond(o: Obj[AlarmSpec, AlarmStatus]) -> AlarmCreated:
        view = ALARM.to_view(o)
        return AlarmCreated(**msgspec.structs.asdict(view), webhook_secret=secret)

    return await crud.create(ctx, store, ALARM, obj, respond=respond)


def secret_of(alarm: Obj[AlarmSpec, AlarmStatus], sealer: Sealer) -> bytes:
    """The alarm's webhook HMAC key (unsealed)."""
    return sealer.decrypt(alarm.spec.sealed_secret, alarm.id.encode())


async def alarm_history(
    ctx: Context, store: Store, ref: str, *, limit: int = 100, cursor: str | None = None
) -> AlarmHistoryPage:
    """One page of the alarm's history, newest first."""
    alarm = await crud.get(ctx, store, ALARM, ref)
    prefix = alarm.id + "."
    after = crud.decode_cursor(cursor) if cursor else (prefix, "")
    if not after[0].startswith(prefix):
        raise errors.ValidationFailed(
            "the cursor belongs to another alarm's history; pass back the next_cursor of the previous page",
            invalid_params=[{"name": "cursor", "reason": "another alarm"}],
        )
    records = await store.list(ALARM_HISTORY.name, project=alarm.project, after=after, limit=limit + 1)
    records = [r for r in records if r.name.startswith(prefix)]
    more = len(records) > limit
    records = records[:limit]
    items = []
    for record in records:
        s = ALARM_HISTORY.load(record).spec
        items.append(
            msgspec.convert(
                {k: v for k, v in msgspec.structs.asdict(s).items() if k not in ("alarm_id", "transition")},
                AlarmHistoryEntry,
            )
        )
    return AlarmHistoryPage(
        items=items, next_cursor=crud.encode_cursor(records[-1].name, records[-1].id) if more and records else None
    )
