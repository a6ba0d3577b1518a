"""sd_notify over a real datagram socket, as systemd would receive it."""

from __future__ import annotations

import socket

from agent import systemd


def test_notify_sends_a_datagram_to_notify_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert systemd.notify("READY=1")
        assert server.recv(100) == b"READY=1"


def test_notify_is_a_no_op_outside_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


def test_watchdog_interval_is_half_the_timeout(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert systemd.watchdog_interval() is None


async def test_the_watchdog_pings_only_while_the_store_writer_lives(tmp_path, monkeypatch):
    import asyncio

    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        answers = iter([True, True, False])
        async with asyncio.timeout(5):
            await systemd.watchdog_loop(lambda: next(answers), 0.01)  # returns once the writer is dead
        got = []
        while True:
            try:
                got.append(server.recv(100))
            except BlockingIOError:
                break
    assert got[:2] == [b"WATCHDOG=1", b"WATCHDOG=1"]
    assert b"WATCHDOG=1" not in got[2:] and got[2].startswith(b"STATUS=")
