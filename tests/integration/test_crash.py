"""SIGKILL during a burst of writes: after a restart every acknowledged write is there and the store is consistent."""

from __future__ import annotations

import sqlite3
import threading
import time

from minicloud.client import ApiError, ConnectError
from tests.conftest import make_ssh_key
from tests.integration.conftest import Agent

WRITERS = 8


def _writer(agent: Agent, index: int, acked: list[str], stop: threading.Event) -> None:
    client = agent.client()
    key = make_ssh_key()
    n = 0
    while not stop.is_set():
        name = f"w{index}-{n}"
        n += 1
        try:
            client.keypairs.create(name=name, public_key=key)
        except (ApiError, ConnectError, OSError):
            return
        acked.append(name)


def test_sigkill_during_writes_loses_no_acknowledged_write(tmp_path):
    agent = Agent(tmp_path / "node").start()
    acked: list[str] = []
    stop = threading.Event()
    threads = [threading.Thread(target=_writer, args=(agent, i, acked, stop)) for i in range(WRITERS)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while len(acked) < 300 and time.monotonic() < deadline:
        time.sleep(0.02)
    agent.kill()
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acked) >= 50, "the writers barely got going"

    agent.start()
    names = [k.name for k in agent.client().keypairs.list()]
    missing = set(acked) - set(names)
    assert not missing, f"{len(missing)} acknowledged writes lost"
    assert len(names) == len(set(names))

    agent.stop()
    db = sqlite3.connect(agent.data_dir / "state.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    (meta_rev,) = db.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()
    (max_change,) = db.execute("SELECT max(revision) FROM changes").fetchone()
    (max_record,) = db.execute("SELECT max(revision) FROM records").fetchone()
    assert meta_rev == max_change >= max_record
    (created,) = db.execute("SELECT count(*) FROM changes WHERE type = 'created' AND kind = 'keypair'").fetchone()
    assert created == len(names)
