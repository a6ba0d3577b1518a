"""Operations: a restarted node fails only its own interrupted operations, found through the node index."""

from __future__ import annotations

import pytest

from minicloud.operations import Operations
from minicloud.state import Create, SQLiteStore, Txn


@pytest.fixture
async def store(tmp_path):
    s = SQLiteStore(tmp_path / "state.db", retain_changes=1000)
    await s.open()
    yield s
    await s.close()


async def test_recover_fails_this_nodes_running_operations_only(store):
    mine, other = Operations(store, "n1"), Operations(store, "n2")
    running = mine.new_record("x.test", {}, "p")
    theirs = other.new_record("x.test", {}, "p")
    await store.commit(Txn([Create(running), Create(theirs)]))
    assert await mine.recover() == 1
    failed = await store.get("operation", running.id)
    assert failed.status["state"] == "failed" and "retry it" in failed.status["error"]["detail"]
    assert (await store.get("operation", theirs.id)).status["state"] == "running"
    assert await mine.recover() == 0
