"""API keys record when they were last used: noted per request in memory, written at most once per interval."""

from __future__ import annotations

from minicloud.api.auth import LAST_USED
from minicloud.api.keys import STORE
from minicloud.iam import apikeys
from minicloud.state import Create, Txn


async def test_a_used_key_shows_when_it_was_last_used(api):
    keys = (await (await api.get("/v1/apikeys")).json())["items"]
    key_id = next(k["id"] for k in keys if k["name"] == "test-admin")
    assert await api.app[LAST_USED].flush(api.app[STORE]) == 1
    shown = await (await api.get(f"/v1/apikeys/{key_id}")).json()
    assert shown["last_used_at"] is not None


async def test_last_used_is_written_at_most_once_per_interval(api):
    store = api.app[STORE]
    record, _token = apikeys.new_key("default", "k1", "", None, {}, principal="user:usr-admin")
    await store.commit(Txn([Create(record)]))
    tracker = apikeys.LastUsed(interval=60)
    tracker.touch(record.id, "2026-01-01T00:00:00.000Z")
    assert await tracker.flush(store) == 1
    revision = (await store.get(apikeys.KIND, record.id)).revision
    tracker.touch(record.id, "2026-01-01T00:00:30.000Z")  # within the interval: nothing written
    assert await tracker.flush(store) == 0
    assert (await store.get(apikeys.KIND, record.id)).revision == revision
    tracker.touch(record.id, "2026-01-01T00:01:30.000Z")
    assert await tracker.flush(store) == 1
    assert (await store.get(apikeys.KIND, record.id)).status["last_used_at"] == "2026-01-01T00:01:30.000Z"


async def test_a_deleted_key_is_skipped(api):
    tracker = apikeys.LastUsed()
    tracker.touch("ak-gone")
    assert await tracker.flush(api.app[STORE]) == 0


async def test_a_key_verified_once_is_refused_as_soon_as_it_is_revoked_or_expires(api):
    import asyncio

    from minicloud.state import Delete

    store = api.app[STORE]
    expiring, expiring_token = apikeys.new_key("default", "soon", "", 2, {}, principal="user:usr-admin")
    revoked, revoked_token = apikeys.new_key("default", "gone", "", None, {}, principal="user:usr-admin")
    await store.commit(Txn([Create(expiring), Create(revoked)]))
    for token in (expiring_token, revoked_token):
        for _ in range(2):  # the second use is answered from the verified-token memo
            assert (await api.get("/v1/keypairs", headers={"Authorization": f"Bearer {token}"})).status == 200
    current = await store.get(apikeys.KIND, revoked.id)
    await store.commit(Txn([Delete(kind=apikeys.KIND, id=revoked.id, expect_revision=current.revision)]))
    assert (await api.get("/v1/keypairs", headers={"Authorization": f"Bearer {revoked_token}"})).status == 401
    await asyncio.sleep(2.1)  # past its expiry, whatever the scheduling: only the refusal is asserted
    resp = await api.get("/v1/keypairs", headers={"Authorization": f"Bearer {expiring_token}"})
    assert resp.status == 401 and "expired" in (await resp.json())["detail"]
