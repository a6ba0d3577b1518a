"""S3-style access keys: the secret is shown once, stored only encrypted, and recoverable by the node alone."""

from __future__ import annotations

from minicloud.api.accesskeys import KEYSTORE, secret_of
from minicloud.api.keys import STORE
from tests.unit.api.test_conventions import problem


async def test_access_key_secret_is_shown_once_and_kept_encrypted(api):
    resp = await api.post("/v1/accesskeys", json={"name": "backup-job", "description": "nightly"})
    assert resp.status == 201
    created = await resp.json()
    key_id, secret = created["id"], created["secret_access_key"]
    assert key_id.startswith("MCAK") and len(key_id) == 20 and len(secret) == 40
    by_id = await api.get(f"/v1/accesskeys/{key_id}")
    assert by_id.status == 200 and (await by_id.json())["name"] == "backup-job"
    shown = await (await api.get("/v1/accesskeys/backup-job")).text()
    listed = await (await api.get("/v1/accesskeys")).text()
    assert secret not in shown and secret not in listed and "secret" not in listed
    record = await api.app[STORE].get("accesskey", key_id)
    assert secret not in record.spec["secret"]  # encrypted at rest
    assert secret_of(api.app[KEYSTORE], record) == secret
    assert (await api.delete(f"/v1/accesskeys/{key_id}")).status == 204
    await problem(await api.get(f"/v1/accesskeys/{key_id}"), 404)


async def test_access_keys_for_unknown_users_are_refused(api):
    await problem(await api.post("/v1/accesskeys", json={"name": "x", "user": "ghost"}), 404)
