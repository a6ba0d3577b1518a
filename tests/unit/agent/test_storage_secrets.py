"""The cluster's cephx keys stay secret through a bootstrap and a second node's install: sealed in the ``ceph``
record, absent from every log line, from ``storage show`` and from the audit log, and kept in files only this user
can read."""

from __future__ import annotations

import logging

import msgspec
import pytest

from minicloud.core.context import Context, SystemCaller
from minicloud.model.storage import StorageEnable
from minicloud.storage import engine
from minicloud.storage.kinds import CEPH, CEPH_NAME
from tests.unit.agent.test_storage_reconciler import World

#: The fake engine's keys (base64, as Ceph writes them) and the raw bytes of the client key.
PLAIN = ("YWRtaW4=", "b3Nk", "Y2xpZW50LWtleQ==", "client-key")


@pytest.fixture
async def store(tmp_path):
    from minicloud.state.sqlite import SQLiteStore

    s = SQLiteStore(tmp_path / "state.db")
    await s.open()
    yield s
    await s.close()


async def test_keys_are_sealed_and_never_logged_shown_or_audited(tmp_path, store, caplog):
    caplog.set_level(logging.DEBUG)
    cluster: dict = {}
    first = World(tmp_path, store, cluster)
    await first.r.start(first.enqueued.append)
    second = World(tmp_path, store, cluster, node="n2")
    await second.r.start(second.enqueued.append)
    try:
        ctx = Context(principal=SystemCaller("t", admin=True), project="default")
        await engine.enable_storage(ctx, store, StorageEnable(), node="n1")  # audited
        await first.pass_()
        await second.pass_()
        assert second.storage.ceph_secret() is not None  # the second node did install them
        record = await store.get_by_name(CEPH.name, "", CEPH_NAME)
        raw = msgspec.json.encode(record).decode()
        shown = msgspec.json.encode(await engine.show_storage(ctx, store)).decode()
        audited = await store.list("audit", limit=10_000)
        assert audited
        audit = msgspec.json.encode(audited).decode()
        logged = caplog.text + repr([r.__dict__ for r in caplog.records])
        for key in PLAIN:
            for where, text in (("record", raw), ("storage show", shown), ("audit", audit), ("log", logged)):
                assert key not in text, f"a cephx key is in the {where}"
        assert repr(first.storage.ceph_secret()).endswith("key=<hidden>)")
        for world in (first, second):
            keyring = world.r._client_keyring(world.engine)
            assert keyring.stat().st_mode & 0o077 == 0, f"{keyring} is readable by others"
    finally:
        await first.r.close()
        await second.r.close()
