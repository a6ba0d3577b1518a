"""The query service: PromQL from a caller, answered by the node's time-series database for the caller's project only.

Enforcement is the TSDB's, server-side: every query is sent with ``extra_label=project_id=<project id>``, which
VictoriaMetrics adds as a matcher to **every** series selector of the expression after parsing it (the way
prom-label-proxy rewrites the AST), so ``{project="B"}``, ``{project_id="prj-…"}``, ``or`` branches, regex matchers
and subqueries all select only the caller's series; the project in the query text is never trusted. The id, not the
name, is enforced: a project deleted and re-created under the same name is a new id and sees none of the old one's
series. Expressions that *make* series without selecting any (``label_replace(vector(1), "project", "B", "", "")``,
``absent(x{project="B"})``) carry no stored data, but to keep "no series of another project in an answer" true
whatever the expression, answers are filtered once more: a series labelled with another project id, or another
project name, is dropped.

Limits (so one query cannot hold the TSDB): the range of a range query (``metrics.query_max_range_days``), points per
series (``metrics.query_max_points``) and the smallest step (``metrics.query_min_step``); a query that breaks one is a
422 naming the limit. Invalid PromQL is a 422 carrying the parser's own message. The TSDB being unreachable is 503.

Cluster scope (``project=None``) sends no label: every series, for cluster administrators (the API checks).

The API asks for ``passthrough`` answers: the TSDB's ``result`` bytes go to the caller unchanged (never decoded into
Python objects and encoded again) when :func:`owned_bytes` proves, on the bytes, that no series in them names another
project; any doubt (another value, a ``\\u`` escape, a label name merely ending in ``project``) decodes and filters them
as above, so the answer is the same either way, only cheaper.

The TSDB is asked over :mod:`minicloud.observe.http1` (plain HTTP/1.1 keep-alive connections to this node's TSDB),
not aiohttp's client, which cost more CPU per request than the rest of the API's query path.
"""

from __future__ import annotations

import base64
import functools
import math
import re
import time as _time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
from yarl import URL

from minicloud import errors
from minicloud.model.metrics import MetricsResult
from minicloud.observe.http1 import Http1Pool
from minicloud.observe.names import PROJECT_ID_LABEL, PROJECT_LABEL

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, "y": 365 * 86400.0}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)?$")


def parse_duration(text: str, what: str = "step") -> float:
    """``15``, ``15s``, ``5m``, ``1h``, ``2d``, ``1w`` → seconds. Raises a 422 naming ``what``."""
    m = _DURATION.match(text.strip())
    if not m:
        raise errors.ValidationFailed(
            f"{what} {text!r} is not a duration; use seconds or a number with a unit: 15s, 5m, 1h, 2d, 1w",
            invalid_params=[{"name": what, "reason": "not a duration"}],
        )
    return float(m[1]) * _UNITS[m[2] or "s"]


def parse_time(text: str | None, now: float, what: str = "time") -> float:
    """Unix seconds, RFC 3339, ``now``, ``now-1h`` or ``-1h`` → Unix seconds. None → ``now``."""
    if text is None:
        return now
    t = text.strip()
    if t == "now":
        return now
    rel = t.removeprefix("now")
    if rel.startswith("-") and rel[1:2].isdigit() and not rel[1:].replace(".", "").isdigit():
        return now - parse_duration(rel[1:], what)
    try:
        value = float(t)
        if math.isfinite(value):
            return value
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(t.replace("Z", "+00:00"))
    except ValueError:
        raise errors.ValidationFailed(
            f"{what} {text!r} is not a time; use Unix seconds, RFC 3339 (2026-01-02T15:04:05Z), 'now' or '-1h'",
            invalid_params=[{"name": what, "reason": "not a time"}],
        ) from None
    if parsed.tzinfo is None:
        raise errors.ValidationFailed(
            f"{what} {text!r} has no time zone; add one (Z or +01:00)",
            invalid_params=[{"name": what, "reason": "no time zone"}],
        )
    return parsed.timestamp()


@dataclass(frozen=True)
class Limits:
    #: The longest ``end - start`` of a range query, in seconds.
    max_range: float = 15 * 86400.0
    #: The most points per series a range query may return (``(end - start) / step``).
    max_points: int = 11_000
    #: The smallest step, in seconds.
    min_step: float = 1.0


@dataclass(frozen=True)
class RangeWindow:
    start: float
    end: float
    step: float


def range_window(start: str | None, end: str | None, step: str | None, limits: Limits, now: float) -> RangeWindow:
    """Check a range query's window against ``limits`` (pure). Default: the last hour, ~240 points."""
    t_end = parse_time(end, now, "end")
    t_start = parse_time(start, now, "start") if start is not None else t_end - 3600.0
    if t_start > t_end:
        raise errors.ValidationFailed(
            "start is after end; give an earlier start (or leave it out: the last hour)",
            invalid_params=[{"name": "start", "reason": "after end"}],
        )
    span = t_end - t_start
    if span > limits.max_range:
        raise errors.ValidationFailed(
            f"the range is {_human(span)}; the limit is {_human(limits.max_range)} (metrics.query_max_range_days): "
            "query a shorter range",
            invalid_params=[{"name": "start", "reason": "range too long"}],
        )
    if step is None:
        t_step = max(limits.min_step, math.ceil(span / 240) if span else limits.min_step)
    else:
        t_step = parse_duration(step, "step")
    if t_step < limits.min_step:
        raise errors.ValidationFailed(
            f"step {step} is below the smallest allowed, {limits.min_step:g} s (metrics.query_min_step)",
            invalid_params=[{"name": "step", "reason": "step too small"}],
        )
    points = span / t_step + 1
    if points > limits.max_points:
        smallest = math.ceil(span / (limits.max_points - 1))
        raise errors.ValidationFailed(
            f"{int(points)} points per series is over the limit of {limits.max_points} (metrics.query_max_points): "
            f"use a step of at least {smallest} s for this range, or a shorter range",
            invalid_params=[{"name": "step", "reason": "too many points"}],
        )
    return RangeWindow(t_start, t_end, t_step)


_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_WINDOW = re.compile(r"\[\s*([0-9.a-zA-Z]+)\s*(?::\s*[0-9.a-zA-Z]*\s*)?\]")
_OFFSET = re.compile(r"\boffset\s+-?\s*([0-9.a-zA-Z]+)", re.I)
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|y)")


def _compound(text: str) -> float | None:
    """``5m``, ``1h30m``, ``90`` (seconds) → seconds; None for what is no plain duration (``1i``, a typo: the
    TSDB's parser says what is wrong with it)."""
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    parts = _PART.findall(text)
    if not parts or "".join(a + b for a, b in parts) != text:
        return None
    return sum(float(a) * _UNITS[b] for a, b in parts)


def check_lookback(promql: str, limits: Limits) -> None:
    """Refuse (422) an expression whose range selector, subquery window or ``offset`` reaches further back than
    ``limits.max_range``: the range limit holds for instant queries too (``rate(x[10y])`` is one instant query that
    reads ten years). Durations inside strings are not looked at; each window is capped on its own."""
    for what, window, seconds in _windows(promql):
        if seconds > limits.max_range:
            raise errors.ValidationFailed(
                f"the {what} {window} reaches back {_human(seconds)}; the limit is {_human(limits.max_range)} "
                "(metrics.query_max_range_days): use a shorter window",
                invalid_params=[{"name": "query", "reason": f"{what} too long"}],
            )


@functools.lru_cache(maxsize=512)
def _windows(promql: str) -> tuple[tuple[str, str, float], ...]:
    """Every range window and offset of ``promql`` with its seconds (pure; the last 512 expressions are remembered:
    dashboards and alarms repeat theirs, and the API's query text is bounded to 8 KiB)."""
    text = _STRINGS.sub('""', promql)
    out = []
    for what, pattern in (("range", _WINDOW), ("offset", _OFFSET)):
        for m in pattern.finditer(text):
            seconds = _compound(m[1])
            if seconds is not None:
                out.append((what, m[1], seconds))
    return tuple(out)


def _human(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:g} days"
    if seconds >= 3600:
        return f"{seconds / 3600:g} h"
    return f"{seconds:g} s"


@dataclass(frozen=True)
class ProjectScope:
    """The project a query answers for: its ``id`` (enforced) and its ``name`` (the display label, filtered too)."""

    id: str
    name: str

    def owns(self, labels: dict[str, str]) -> bool:
        """False when ``labels`` name another project, by id or by name (a series naming none is kept)."""
        return labels.get(PROJECT_ID_LABEL, self.id) == self.id and labels.get(PROJECT_LABEL, self.name) == self.name


_KEYS = ((PROJECT_ID_LABEL, PROJECT_ID_LABEL.encode() + b'"'), (PROJECT_LABEL, PROJECT_LABEL.encode() + b'"'))


def owned_bytes(raw: bytes, project: ProjectScope) -> bool:
    """True when the JSON ``raw`` has no key ``project_id`` or ``project`` whose value is not ``project``'s (pure).

    Sound on the bytes of valid JSON (the TSDB's answer has been decoded once): without ``\\u`` escapes a key spelled
    ``project_id`` contains ``project_id"`` (inside a string a quote is escaped, so no string *content* ends with
    ``d"``); every such place is counted (string values that merely end so count too, which only adds doubt), and
    the answer is True only when there are exactly as many ``"project_id":"<the project's id>"`` — a whole key and
    a whole value, as the TSDB writes them, without spaces. The same for ``project`` and the project's name. False
    means "decode and filter". Plain ``bytes.count``: two passes per label over the answer, no regular expression."""
    if b"\\" in raw and b"\\u" in raw:  # one byte is a memchr; two bytes took ~20 us on an 8 kB answer
        return False
    for (label, key), value in zip(_KEYS, (project.id, project.name), strict=True):
        keys = raw.count(key)
        if keys and raw.count(_owned_pair(label, value)) != keys:
            return False
    return True


@functools.lru_cache(maxsize=256)
def _owned_pair(label: str, value: str) -> bytes:
    """``"label":"value"`` as the TSDB writes it (its value a whole JSON string; built once per project)."""
    return b'"%s":%s' % (label.encode(), msgspec.json.encode(value))


class _Data(msgspec.Struct):
    resultType: str = ""  # the Prometheus API's name
    result: msgspec.Raw = msgspec.Raw(b"[]")


class _Answer(msgspec.Struct):
    status: str = ""
    data: msgspec.Raw = msgspec.Raw(b"null")
    error: str = ""


class _QueryAnswer(msgspec.Struct):
    """A query's answer decoded in one pass (its ``data`` an object; else read as :class:`_Answer`)."""

    status: str = ""
    data: _Data = msgspec.field(default_factory=_Data)
    error: str = ""


def only_project(result_type: str, result: Any, project: ProjectScope) -> Any:
    """Drop series labelled with a project other than ``project`` (pure; see the module docstring)."""
    if result_type not in ("vector", "matrix") or not isinstance(result, list):
        return result
    return [s for s in result if project.owns(s.get("metric") or {})]


class QueryService:
    """Queries one VictoriaMetrics (``base_url``, with HTTP basic auth when ``auth`` is given). ``project=None`` is
    cluster scope. Opens its HTTP session on first use; :meth:`close` it."""

    def __init__(
        self,
        base_url: str | Callable[[], str],
        *,
        auth: tuple[str, str] | None = None,
        limits: Limits = Limits(),
        timeout: float = 30.0,
        nocache: bool = False,
        clock: Callable[[], float] = _time.time,
    ) -> None:
        #: The TSDB's URL, or a function giving it now (its port may change when it restarts).
        self._base_url = base_url
        self._headers = {"Authorization": basic_auth(*auth)} if auth else {}
        self.limits = limits
        self.timeout = timeout
        #: Ask the TSDB to bypass its response cache (tests; instant queries always do).
        self.nocache = nocache
        self.clock = clock
        #: Keep-alive connections to the TSDB, and the base URL they are for (a new one closes them).
        self._pool: Http1Pool | None = None
        self._pool_for = ""
        self._prefix = ""

    @property
    def base_url(self) -> str:
        url = self._base_url() if callable(self._base_url) else self._base_url
        return url.rstrip("/")

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    async def query(
        self, promql: str, *, time: str | None = None, project: ProjectScope | None, passthrough: bool = False
    ) -> MetricsResult:
        """An instant query at ``time`` (default now) for ``project`` (None: cluster scope). ``passthrough``: the
        answer's ``result`` may be the TSDB's bytes (``msgspec.Raw``, for the API to send on), not Python objects."""
        check_lookback(promql, self.limits)
        params = {"query": promql, "time": f"{parse_time(time, self.clock()):.3f}", "nocache": "1"}
        data = await self._get("/api/v1/query", params, project, _QueryAnswer)
        return self._result(data, project, passthrough)

    async def query_range(
        self,
        promql: str,
        *,
        start: str | None = None,
        end: str | None = None,
        step: str | None = None,
        project: ProjectScope | None,
        exact: bool = False,
        passthrough: bool = False,
    ) -> MetricsResult:
        """A range query for ``project`` (None: cluster scope), its window checked against the limits first.
        ``exact``: points at exactly ``start + k * step`` (the TSDB's cache, which aligns the window to the step, is
        bypassed; alarms need it)."""
        w = range_window(start, end, step, self.limits, self.clock())
        check_lookback(promql, self.limits)
        params = {"query": promql, "start": f"{w.start:.3f}", "end": f"{w.end:.3f}", "step": f"{w.step:g}s"}
        if self.nocache or exact:
            params["nocache"] = "1"
        data = await self._get("/api/v1/query_range", params, project, _QueryAnswer)
        result = self._result(data, project, passthrough)
        result.start, result.end, result.step = w.start, w.end, w.step
        return result

    async def series(
        self, match: str, *, project: ProjectScope | None, start: float, end: float
    ) -> list[dict[str, str]]:
        """``/api/v1/series`` for one matcher (label sets), scoped like the queries."""
        params = {"match[]": match, "start": f"{start:.3f}", "end": f"{end:.3f}"}
        data = msgspec.json.decode(bytes(await self._get("/api/v1/series", params, project)))
        found = data if isinstance(data, list) else []
        return [s for s in found if project is None or project.owns(s)]

    # -- plumbing --------------------------------------------------------------------------------------------------
    def _result(
        self, data: _Data | msgspec.Raw, project: ProjectScope | None, passthrough: bool = False
    ) -> MetricsResult:
        if isinstance(data, _Data):
            answer = data
        else:
            try:
                answer = msgspec.json.decode(bytes(data), type=_Data)
            except msgspec.ValidationError:  # not the Prometheus shape: nothing in it
                return MetricsResult(result_type="", result=[])
        rtype, raw = answer.resultType, bytes(answer.result)
        if passthrough and (project is None or owned_bytes(raw, project)):
            return MetricsResult(result_type=rtype, result=msgspec.Raw(raw))
        result = msgspec.json.decode(raw)
        if project is not None:
            result = only_project(rtype, result, project)
        return MetricsResult(result_type=rtype, result=result)

    def _http(self) -> Http1Pool:
        """The connection pool for the TSDB's URL now (plain HTTP on this node: see :mod:`minicloud.observe.http1`,
        chosen over aiohttp's client for its CPU per request)."""
        base = self.base_url
        if self._pool is None or base != self._pool_for:
            url = URL(base)
            if url.scheme != "http" or not url.host:
                raise errors.Unavailable(
                    f"the metrics database URL {base!r} is not http://host:port (this node's TSDB)"
                )
            if self._pool is not None:
                self._pool.close()
            self._pool = Http1Pool(url.host, url.port or 80, headers=self._headers)
            self._pool_for, self._prefix = base, url.path.rstrip("/")
        return self._pool

    async def _get(
        self, path: str, params: dict[str, str], project: ProjectScope | None, shape: type[Any] = _Answer
    ) -> Any:
        """The TSDB's ``data`` of a successful answer (``msgspec.Raw``; a :class:`_Data` when ``shape`` is
        :class:`_QueryAnswer` and the answer has that shape); its refusal as a 422, its failure as a 503."""
        query: list[tuple[str, str]] = list(params.items())
        if project is not None:
            query.append(("extra_label", f"{PROJECT_ID_LABEL}={project.id}"))
        http = self._http()
        # quoted here by yarl (in C)
        target = URL.build(path=self._prefix + path, query=query).raw_path_qs
        try:
            got = await http.get(target, timeout=self.timeout)
            status = got.status
            try:
                answer = msgspec.json.decode(got.body, type=shape)
            except msgspec.ValidationError:  # JSON of another shape: the plain envelope, its data as it is
                answer = msgspec.json.decode(got.body, type=_Answer)
        except (OSError, TimeoutError, ValueError, msgspec.DecodeError) as exc:
            raise errors.Unavailable(
                f"the metrics database on this node did not answer ({type(exc).__name__}); retry, or ask an "
                "administrator to check `minicloud metrics status` and the agent log",
                headers={"Retry-After": "5"},
            ) from None
        if status == 200 and answer.status == "success":
            return answer.data
        message = answer.error
        if 400 <= status < 500:
            raise errors.ValidationFailed(
                f"the query was refused: {_parser_message(message)}",
                invalid_params=[{"name": "query", "reason": _parser_message(message)}],
            )
        raise errors.Unavailable(f"the metrics database failed ({status}): {message[:500]}")


def basic_auth(user: str, password: str) -> str:
    """An HTTP basic ``Authorization`` header value."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _parser_message(message: str) -> str:
    """VictoriaMetrics says ``error when executing query="…" for (time=…, step=…): <reason>`` (or ``cannot parse
    …: <reason>``): keep the reason, which is the parser's own words."""
    m = re.search(r"\): (.*)$", message, re.S) or re.search(r"cannot parse [^:]*: (.*)$", message, re.S)
    return (m[1] if m else message).strip()[:1000] or "invalid query"
