"""The query service's own rules: time and duration parsing, range limits, the answer filter, and how the TSDB's
refusals become problems (invalid PromQL with the parser's message)."""

from __future__ import annotations

import pytest

from minicloud import errors
from minicloud.observe.query import (
    Limits,
    ProjectScope,
    QueryService,
    check_lookback,
    only_project,
    parse_duration,
    parse_time,
    range_window,
)

NOW = 1_800_000_000.0


def test_durations_and_times():
    assert parse_duration("15s") == 15
    assert parse_duration("5m") == 300
    assert parse_duration("2d") == 172800
    assert parse_duration("30") == 30
    assert parse_time(None, NOW) == NOW
    assert parse_time("now", NOW) == NOW
    assert parse_time("-1h", NOW) == NOW - 3600
    assert parse_time("now-10m", NOW) == NOW - 600
    assert parse_time("1700000000.5", NOW) == 1700000000.5
    assert parse_time("2026-01-02T03:04:05Z", NOW) == 1767323045.0
    with pytest.raises(errors.ValidationFailed, match="no time zone"):
        parse_time("2026-01-02T03:04:05", NOW)
    with pytest.raises(errors.ValidationFailed, match="not a duration"):
        parse_duration("5 minutes")


def test_the_range_defaults_to_the_last_hour():
    w = range_window(None, None, None, Limits(), NOW)
    assert (w.start, w.end, w.step) == (NOW - 3600, NOW, 15)


def test_a_range_too_long_is_refused_naming_the_limit():
    with pytest.raises(errors.ValidationFailed, match="query_max_range_days"):
        range_window("-16d", None, "1h", Limits(max_range=15 * 86400), NOW)


def test_a_step_too_small_is_refused():
    with pytest.raises(errors.ValidationFailed, match="query_min_step"):
        range_window("-1h", None, "100ms", Limits(min_step=1), NOW)
    with pytest.raises(errors.ValidationFailed, match="at least 10 s"):
        range_window("-1d", None, "1s", Limits(max_points=8641), NOW)
    assert range_window("-1d", None, "10s", Limits(max_points=8641), NOW).step == 10


@pytest.mark.parametrize(
    "promql",
    [
        "rate(minicloud_instance_cpu_seconds_total[16d])",
        "minicloud_node_load1 offset 30d",
        "max_over_time(rate(x[5m])[400d:1h])",
        "sum(x) offset -1y",
        "rate(x[15d1h])",
    ],
)
async def test_an_instant_query_cannot_reach_back_past_the_range_limit(promql):
    """The range limit binds instant queries too: a window or offset past it is a 422 before the TSDB is asked
    (the service points at nothing: asking would be a 503)."""
    service = QueryService("http://127.0.0.1:9", limits=Limits(max_range=15 * 86400))
    with pytest.raises(errors.ValidationFailed, match="query_max_range_days"):
        await service.query(promql, project=None)
    with pytest.raises(errors.ValidationFailed, match="query_max_range_days"):
        await service.query_range(promql, start="-1h", project=None)
    await service.close()


def test_windows_within_the_limit_and_durations_in_strings_pass():
    limits = Limits(max_range=15 * 86400)
    for promql in ("rate(x[15d])", 'x{a="[400d]"}', "rate(x[1h30m])", "rate(x[1i])", "x offset 5m"):
        check_lookback(promql, limits)


def test_start_after_end_is_refused():
    with pytest.raises(errors.ValidationFailed, match="after end"):
        range_window("now", "-1h", None, Limits(), NOW)


def test_the_answer_filter_drops_other_projects_by_id_or_name_and_keeps_unlabelled_series():
    a = ProjectScope(id="prj-a", name="a")
    result = [
        {"metric": {"project": "b", "project_id": "prj-b"}},
        {"metric": {"project": "a", "project_id": "prj-a"}},
        {"metric": {"project": "a", "project_id": "prj-a-old"}},  # an earlier project of the same name
        {"metric": {"project": "b", "project_id": "prj-a"}},  # made by label_replace: another name shown
        {"metric": {"project_id": "prj-b"}},
        {"metric": {}},
    ]
    assert only_project("vector", result, a) == [{"metric": {"project": "a", "project_id": "prj-a"}}, {"metric": {}}]
    assert only_project("scalar", [1, "2"], a) == [1, "2"]


@pytest.mark.parametrize(
    "promql",
    ["sum(rate(x[5m]", "x{", "1 +", "foo bar"],
)
async def test_invalid_promql_is_a_422_with_the_parsers_message(victoria, promql):
    service = QueryService(victoria.url, auth=victoria.auth)
    try:
        with pytest.raises(errors.ValidationFailed) as info:
            await service.query(promql, project=ProjectScope(id="prj-pa", name="pa"))
    finally:
        await service.close()
    reason = info.value.invalid_params[0]["reason"]
    assert "error when executing" not in reason and reason  # the parser's words, not the wrapper
    assert info.value.detail.startswith("the query was refused: ")


async def test_an_unreachable_tsdb_is_503():
    service = QueryService("http://127.0.0.1:9", timeout=2)
    try:
        with pytest.raises(errors.Unavailable):
            await service.query("up", project=ProjectScope(id="prj-pa", name="pa"))
    finally:
        await service.close()


def test_owned_bytes_passes_only_answers_that_name_no_other_project():
    from minicloud.observe.query import ProjectScope, owned_bytes

    pa = ProjectScope(id="prj-a", name="pa")
    own = b'[{"metric":{"__name__":"x","project":"pa","project_id":"prj-a"},"value":[1,"2"]}]'
    assert owned_bytes(own, pa)
    assert owned_bytes(b'[{"metric":{"node":"n1"},"value":[1,"2"]}]', pa)  # naming none: kept, as only_project
    assert owned_bytes(b"[]", pa)
    for doubt in (
        b'[{"metric":{"project":"pb","project_id":"prj-a"},"value":[1,"2"]}]',  # another name
        b'[{"metric":{"project_id":"prj-b"},"value":[1,"2"]}]',  # another id
        b'[{"metric":{"project_id":"prj-ab"},"value":[1,"2"]}]',  # a longer id
        b'[{"metric":{"project_id" : "prj-b"},"value":[1,"2"]}]',  # spaces
        b'[{"metric":{"\\u0070roject":"pb"},"value":[1,"2"]}]',  # an escaped key
        b'[{"metric":{"exported_project":"pa"},"value":[1,"2"]}]',  # a key merely ending in project
        b'[{"metric":{"x":"\\"project\\":\\"pa\\"","project":"pb"},"value":[1,"2"]}]',  # a look-alike in a value
    ):
        assert not owned_bytes(doubt, pa), doubt


@pytest.mark.parametrize("data", [b"null", b"[1]", b'"x"'])
async def test_an_answer_whose_data_is_not_the_prometheus_shape_is_an_empty_result(data):
    """Decoded in one pass when ``data`` is an object; anything else is read as the plain envelope, and holds nothing."""
    import asyncio

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"status":"success","data":%s}' % data
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    service = QueryService(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    try:
        result = await service.query("up", project=ProjectScope(id="prj-pa", name="pa"), passthrough=True)
    finally:
        await service.close()
        server.close()
    assert result.result_type == "" and result.result == []
