"""A node's logs: each format's time, lines without one, consoles timed by the agent's notes, filters and bounded
grep, merging by time across nodes, copy-truncate rotation and age pruning, following, and syslog forwarding."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import time

import pytest

from minicloud.model.logs import LogLine
from minicloud.observe import logs
from minicloud.observe.syslog import Forwarder, format_5424, frame

T0 = 1767366245.0  # 2026-01-02T15:04:05Z


def _source(data, service):
    return next(s for s in logs.discover(data) if s.service == service)


def _lines(data, service):
    source = _source(data, service)
    return [ln for path in source.files() for ln in logs.parse_file(source, path, "n1", data)]


def test_each_format_gives_its_time(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "agent.log").write_text(
        '{"time": "2026-01-02T15:04:05.250Z", "level": "info", "logger": "minicloud.agent", "msg": "ready"}\n'
    )
    (tmp_path / "etcd.log").write_text(
        '{"level":"warn","ts":"2026-01-02T15:04:06.123456Z","caller":"etcdserver/x.go:1","msg":"slow"}\n'
        '{"level":"info","ts":1767366247.5,"msg":"epoch seconds"}\n'
    )
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "tsdb.log").write_text(
        "2026-01-02T15:04:08.000Z\tinfo\tVictoriaMetrics/app/vmstorage/main.go:1\tstarted\n"
    )
    (tmp_path / "ceph" / "log").mkdir(parents=True)
    (tmp_path / "ceph" / "log" / "mon.n1.log").write_text(
        "2026-01-02T15:04:09.123456+0000 7f0a 1 mon.n1@0(leader) e1 hello\n"
        "2026-01-02T16:04:10.000+0100 7f0a 1 mon.n1@0(leader) an hour ahead of UTC\n"
    )
    (tmp_path / "ceph" / "log" / "client.rgw.n1.log").write_text("2026-01-02T15:04:11.5+0000 7f 1 beast: GET /\n")
    assert [(ln.ts, ln.level) for ln in _lines(tmp_path, "agent")] == [(T0 + 0.25, "info")]
    assert [(round(ln.ts, 6), ln.level) for ln in _lines(tmp_path, "etcd")] == [(T0 + 1.123456, "warn"), (T0 + 2.5, "info")]  # fmt: skip
    assert [(ln.ts, ln.level) for ln in _lines(tmp_path, "tsdb")] == [(T0 + 3, "info")]
    assert [round(ln.ts, 6) for ln in _lines(tmp_path, "ceph")] == [T0 + 4.123456, T0 + 5]
    rgw = _lines(tmp_path, "rgw")
    assert [ln.ts for ln in rgw] == [T0 + 6.5] and rgw[0].source == "ceph/log/client.rgw.n1.log"
    assert rgw[0].time == "2026-01-02T15:04:11.500000Z"


def test_syslog_times_are_local_and_the_year_is_guessed():
    now = time.mktime((2026, 1, 2, 12, 0, 0, 0, 0, -1))
    assert logs.parse_syslog("Jan  2 11:00:00 dnsmasq[12]: started", now) == now - 3600
    # a December line read in January is last year's
    assert logs.parse_syslog("Dec 31 23:00:00 dnsmasq-dhcp[12]: DHCPACK", now) == time.mktime(
        (2025, 12, 31, 23, 0, 0, 0, 0, -1)
    )
    assert logs.parse_syslog("not a time", now) is None


def test_lines_without_a_time_take_their_neighbours(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "agent.log").write_text(
        "a head line before any time\n"
        '{"time": "2026-01-02T15:04:05Z", "level": "error", "msg": "boom"}\n'
        "Traceback (most recent call last):\n"
        "\n"
        '{"time": "2026-01-02T15:04:07Z", "level": "info", "msg": "next"}\n'
    )
    got = [(ln.line[:9], ln.ts) for ln in _lines(tmp_path, "agent")]
    assert got == [("a head li", T0), ('{"time": ', T0), ("Traceback", T0), ('{"time": ', T0 + 2)]


def test_a_console_line_is_timed_when_the_agent_first_saw_it(tmp_path):
    console = tmp_path / "instances" / "i-1" / "console.log"
    console.parent.mkdir(parents=True)
    console.write_bytes(b"boot 1\nboot 2\n")
    assert logs.note_console(console, now=T0)
    assert not logs.note_console(console, now=T0 + 1)  # nothing new: no note
    with console.open("ab") as f:
        f.write(b"login: \r\n")
    logs.note_console(console, now=T0 + 10)
    with console.open("ab") as f:
        f.write(b"unseen yet\n")
    os.utime(console, (T0 + 20, T0 + 20))
    got = [(ln.line, ln.ts, ln.instance) for ln in _lines(tmp_path, "console")]
    assert got == [("boot 1", T0, "i-1"), ("boot 2", T0, "i-1"), ("login: ", T0 + 10, "i-1"), ("unseen yet", T0 + 20, "i-1")]  # fmt: skip


def _line(ts, node, text="x", service="agent"):
    return LogLine(time=logs.iso(ts), ts=ts, node=node, service=service, line=text)


def test_nodes_are_merged_by_time_keeping_the_newest():
    n1 = [_line(1, "n1"), _line(4, "n1"), _line(6, "n1")]
    n2 = [_line(2, "n2"), _line(3, "n2"), _line(7, "n2")]
    n3: list[LogLine] = []
    assert [(ln.ts, ln.node) for ln in logs.merge([n1, n2, n3], 0)] == [
        (1, "n1"), (2, "n2"), (3, "n2"), (4, "n1"), (6, "n1"), (7, "n2")
    ]  # fmt: skip
    assert [ln.ts for ln in logs.merge([n1, n2], 3)] == [4, 6, 7]


def _node(tmp_path):
    (tmp_path / "logs").mkdir(parents=True)
    rows = [f'{{"time": "{logs.iso(T0 + i)}", "level": "info", "msg": "agent line {i}"}}' for i in range(10)]
    (tmp_path / "logs" / "agent.log").write_text("\n".join(rows) + "\n")
    for iid in ("i-a", "i-b"):
        c = tmp_path / "instances" / iid / "console.log"
        c.parent.mkdir(parents=True)
        c.write_text(f"console of {iid}\n")
        logs.note_console(c, now=T0 + 5)
    return tmp_path


def test_filters_since_service_instances_and_limit(tmp_path):
    data = _node(tmp_path)
    got = logs.read_node(data, "n1", logs.Filter(since=T0 + 7, services={"agent"}), 100)
    assert [ln.line[-12:] for ln in got] == ['agent line 7"}', 'agent line 8"}', 'agent line 9"}'] or [
        ln.ts for ln in got
    ] == [T0 + 7, T0 + 8, T0 + 9]
    only_a = logs.read_node(data, "n1", logs.Filter(instances={"i-a"}), 100)
    assert [(ln.service, ln.instance, ln.line) for ln in only_a] == [("console", "i-a", "console of i-a")]
    newest = logs.read_node(data, "n1", logs.Filter(), 3)
    assert [ln.ts for ln in newest] == [T0 + 7, T0 + 8, T0 + 9]


def test_grep_is_an_extended_regex_and_bounded(tmp_path, monkeypatch):
    data = _node(tmp_path)
    got = logs.read_node(data, "n1", logs.Filter(pattern="line [35]|of i-b"), 100)
    assert [ln.line[-14:] for ln in got] == ['agent line 3"}', 'agent line 5"}', "console of i-b"]
    for bad, why in [
        ("(a)\\1", "back-references"),
        ("x" * 513, "1 to 512"),
        ("a[", "invalid pattern"),
        ("a\nb", "one line"),
    ]:
        with pytest.raises(logs.PatternError, match=why):
            logs.check_pattern(bad)
    logs.check_pattern("\\\\1 is a backslash and a one")  # an escaped backslash then 1 is no back-reference

    def slow(*args, **kw):
        raise subprocess.TimeoutExpired(args[0], kw["timeout"])

    monkeypatch.setattr(logs.subprocess, "run", slow)
    with pytest.raises(logs.PatternError, match="took more than 2 s"):
        logs.grep("x", ["a line"], 2.0)


def test_copy_truncate_rotation_keeps_n_copies_and_the_console_notes(tmp_path):
    console = tmp_path / "instances" / "i-1" / "console.log"
    console.parent.mkdir(parents=True)
    for n in range(4):
        console.write_bytes(f"generation {n}\n".encode() * 10)
        logs.note_console(console, now=T0 + n)
        assert logs.rotate(console, max_bytes=50, backups=2)
    assert console.read_bytes() == b""
    assert console.with_name("console.log.1").read_bytes().startswith(b"generation 3")
    assert console.with_name("console.log.2").read_bytes().startswith(b"generation 2")
    assert not console.with_name("console.log.3").exists()
    assert logs.read_times(console.with_name("console.log.1")) == [(130, T0 + 3)]
    assert not logs.rotate(console, max_bytes=50, backups=2)  # small: left alone
    # rotated copies are read oldest first, with their own notes
    lines = _lines(tmp_path, "console")
    assert (lines[0].line, lines[0].ts, lines[-1].line, lines[-1].ts) == (
        "generation 2",
        T0 + 2,
        "generation 3",
        T0 + 3,
    )
    # age: copies older than max_age go, the current file stays
    old = console.with_name("console.log.2")
    os.utime(old, (T0, T0))
    removed = logs.prune(_source(tmp_path, "console"), max_age=3600, now=T0 + 7200)
    assert removed == [old] and console.exists() and console.with_name("console.log.1").exists()


def test_a_writer_appending_goes_on_after_copy_truncate(tmp_path):
    path = tmp_path / "etcd.log"
    with path.open("ab") as writer:  # as etcd's and the TSDB's stderr are opened
        writer.write(b'{"ts": 1, "msg": "before"}\n' * 10)
        writer.flush()
        assert logs.rotate(path, max_bytes=10, backups=1)
        writer.write(b'{"ts": 2, "msg": "after"}\n')
        writer.flush()
    assert path.read_bytes() == b'{"ts": 2, "msg": "after"}\n'  # no hole of zeros where the old content was


def test_follow_sees_appended_lines_new_files_and_rotation(tmp_path):
    data = _node(tmp_path)
    follower = logs.Follower(data, "n1", logs.Filter(services={"agent", "console"}))
    assert follower.poll() == []
    agent = data / "logs" / "agent.log"
    with agent.open("a") as f:
        f.write(f'{{"time": "{logs.iso(T0 + 20)}", "msg": "new"}}\n{{"time": "{logs.iso(T0 + 21)}", "msg": "part')
    assert [ln.ts for ln in follower.poll()] == [T0 + 20]  # a partial line waits for its end
    with agent.open("a") as f:
        f.write('ial"}\n')
    assert [ln.line for ln in follower.poll()] == [f'{{"time": "{logs.iso(T0 + 21)}", "msg": "partial"}}']
    fresh = data / "instances" / "i-c" / "console.log"
    fresh.parent.mkdir()
    fresh.write_text("hello from i-c\n")
    assert [(ln.instance, ln.line) for ln in follower.poll()] == [("i-c", "hello from i-c")]
    logs.rotate(fresh, max_bytes=1, backups=1)
    fresh.write_text("after rotation\n")
    assert [ln.line for ln in follower.poll()] == ["after rotation"]


def test_retention_pass_rotates_daemons_not_the_agents_own_log(tmp_path):
    data = _node(tmp_path)
    (data / "etcd.log").write_bytes(b'{"ts": 1}\n' * 100)
    agent_before = (data / "logs" / "agent.log").read_bytes()
    assert logs.retention_pass(data, max_bytes=100, backups=1, max_age=3600) == 1
    assert (data / "etcd.log.1").exists() and (data / "logs" / "agent.log").read_bytes() == agent_before


def test_rfc5424_message_and_octet_counting():
    line = LogLine(
        time="2026-01-02T15:04:05.250000Z", ts=T0, node="n1", service="etcd", line='slow "apply" ]', level="warn",
        source="etcd.log",
    )  # fmt: skip
    msg = format_5424(line)
    assert msg == (
        b'<28>1 2026-01-02T15:04:05.250000Z n1 etcd - log [minicloud@32473 source="etcd.log"] \xef\xbb\xbfslow "apply" ]'
    )
    console = LogLine(time=line.time, ts=T0, node="n 1", service="console", line="login:", instance="i-1", source='a"b')
    assert format_5424(console).startswith(b'<14>1 2026-01-02T15:04:05.250000Z n1 console - log [minicloud@32473 source="a\\"b" instance="i-1"]')  # fmt: skip
    assert frame(b"hello") == b"5 hello"


async def _collector(ssl_context=None):
    received: list[bytes] = []
    got = asyncio.Event()

    async def handle(reader, writer):
        while True:
            try:
                size = int((await reader.readuntil(b" ")).strip())
            except (asyncio.IncompleteReadError, ValueError):
                return
            received.append(await reader.readexactly(size))
            got.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ssl_context)
    return server, received, got


async def _until(received, got, count):
    while len(received) < count:
        got.clear()
        await asyncio.wait_for(got.wait(), 30)


@pytest.mark.parametrize("scheme", ["tcp", "tls"])
async def test_forwarding_to_a_syslog_collector(tmp_path, scheme):
    data = _node(tmp_path / "data")
    ctx = None
    ca_file = ""
    if scheme == "tls":
        from minicloud.pki import ensure_node_pki

        pki = ensure_node_pki(tmp_path / "pki-home", "localhost")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(pki.server_cert, pki.server_key)
        ca_file = str(pki.ca_cert)
    server, received, got = await _collector(ctx)
    port = server.sockets[0].getsockname()[1]
    host = "localhost" if scheme == "tls" else "127.0.0.1"
    forwarder = Forwarder(
        f"{scheme}://{host}:{port}", data_path=data, node="n1", services=["agent"], ca_file=ca_file, interval=0.05
    )
    forwarder.start()
    try:
        # history is not sent: only what is written once its follower has noted where the files end
        await asyncio.wait_for(forwarder.follower_ready.wait(), 30)
        with (data / "logs" / "agent.log").open("a") as f:
            f.write(f'{{"time": "{logs.iso(T0 + 30)}", "level": "error", "msg": "forward me"}}\n')
        await _until(received, got, 1)
        assert received[0].startswith(b"<27>1 2026-01-02T15:04:35.000000Z n1 agent - log ")
        assert received[0].endswith(b'"msg": "forward me"}') and len(received) == 1
    finally:
        await forwarder.close()
        server.close()
        await server.wait_closed()


def test_a_node_recorded_without_its_https_address_is_reached_on_this_nodes_port(tmp_path):
    """Nodes that joined a cluster are recorded with their address only: logs, metrics forwarding and scraping
    reach them on this node's own HTTPS port (agent.json)."""
    import json as _json

    from minicloud.cluster.kinds import NodeSpec
    from minicloud.observe.log_access import https_of, own_https_port

    assert own_https_port(tmp_path) is None
    (tmp_path / "agent.json").write_text(_json.dumps({"https": "0.0.0.0:9443"}))
    port = own_https_port(tmp_path)
    assert port == 9443
    assert https_of(NodeSpec(address="10.0.0.2", https="https://10.0.0.2:8443/"), port) == "https://10.0.0.2:8443"
    assert https_of(NodeSpec(address="10.0.0.3"), port) == "https://10.0.0.3:9443"
    assert https_of(NodeSpec(address="fd00::3"), port) == "https://[fd00::3]:9443"
    assert https_of(NodeSpec(address="10.0.0.3"), None) == ""
