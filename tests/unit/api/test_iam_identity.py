"""Identity is by id: deleting a user revokes everything it held; a namesake inherits nothing (issue 9 §2.1),
and credentials of more powerful principals are out of a project owner's reach (§2.8)."""

from __future__ import annotations

import msgspec

from minicloud.api.keys import STORE
from minicloud.iam import apikeys, principals
from minicloud.state import Create, Txn

PASSWORD = "correct horse battery staple"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _user(api, name: str, **extra) -> dict:
    resp = await api.post("/v1/users", json={"name": name, **extra})
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def _grant(api, principal: str, role: str, project: str | None) -> dict:
    resp = await api.post("/v1/rolebindings", json={"role": role, "principal": principal, "scope_project": project})
    assert resp.status == 201, await resp.text()
    return await resp.json()


async def _key(api, user: str, project: str = "default") -> str:
    resp = await api.post(f"/v1/apikeys?project={project}", json={"name": f"{user}-key", "user": user})
    assert resp.status == 201, await resp.text()
    return (await resp.json())["secret"]


async def test_deleting_a_user_revokes_its_keys_sessions_and_access_keys_and_a_namesake_inherits_nothing(api):
    alice = await _user(api, "alice", password=PASSWORD)
    await _grant(api, "user:alice", "member", "default")
    key = await _key(api, "alice")
    access = await api.post("/v1/accesskeys", json={"name": "s3", "user": "alice"})
    assert access.status == 201
    login = await api.post("/v1/auth/login", json={"user": "alice", "password": PASSWORD}, anon=True)
    session = (await login.json())["token"]
    for token in (key, session):
        assert (await api.client.get("/v1/keypairs", headers=bearer(token))).status == 200

    assert (await api.delete("/v1/users/alice")).status == 204
    store = api.app[STORE]
    for kind in (*principals.CREDENTIAL_KINDS, "rolebinding"):
        assert [r for r in await store.list(kind) if r.spec.get("principal") == f"user:{alice['id']}"] == []
    for token in (key, session):
        assert (await api.client.get("/v1/keypairs", headers=bearer(token))).status == 401

    # A new alice, granted admin: the old credentials still do nothing.
    alice2 = await _user(api, "alice")
    assert alice2["id"] != alice["id"]
    await _grant(api, "user:alice", "admin", None)
    for token in (key, session):
        assert (await api.client.get("/v1/users", headers=bearer(token))).status == 401


async def test_a_credential_whose_user_is_gone_authenticates_no_one(api):
    # A key that escaped the delete's sweep (made concurrently with it) still names a user id that no longer exists.
    record, token = apikeys.new_key("default", "orphan", "", None, {}, principal="user:usr-gone")
    await api.app[STORE].commit(Txn([Create(record)]))
    assert (await api.client.get("/v1/keypairs", headers=bearer(token))).status == 401


async def test_bindings_keys_and_audit_name_principals_by_id(api):
    bob = await _user(api, "bob")
    binding = await _grant(api, "user:bob", "viewer", "default")
    assert binding["principal"] == f"user:{bob['id']}" and binding["principal_name"] == "bob"
    assert binding["scope_project_id"] == principals.DEFAULT_PROJECT_ID
    listed = await (await api.get("/v1/rolebindings?principal=user:bob")).json()
    assert [b["id"] for b in listed["items"]] == [binding["id"]]
    key = await api.post("/v1/apikeys", json={"name": "bob-key", "user": "bob"})
    assert (await key.json())["principal"] == f"user:{bob['id']}"
    token = (await key.json())["secret"]
    await api.client.post("/v1/keypairs", json={"name": "k", "public_key": "x"}, headers=bearer(token))  # denied
    entries = await (await api.get("/v1/audit?result=denied")).json()
    assert any(e["principal"] == f"user:{bob['id']}" for e in entries["items"])
    by_name = await (await api.get("/v1/audit?user=user:bob")).json()  # a name means that user's id
    assert by_name["items"] and {e["principal"] for e in by_name["items"]} == {f"user:{bob['id']}"}


async def test_user_names_that_look_like_ids_are_refused_and_the_builtin_admin_cannot_be_deleted(api):
    assert (await api.post("/v1/users", json={"name": "usr-admin2"})).status == 422
    assert (await api.delete("/v1/users/admin")).status == 409
    assert (await api.get("/v1/users", headers=bearer(api.token))).status == 200  # the init key still works


async def test_name_references_of_an_old_database_are_upgraded_once(api):
    store = api.app[STORE]
    carol = await _user(api, "carol")
    stamp = "2000-01-01T00:00:00.000Z"  # older than the current carol: a previous carol's key
    old_key, old_token = apikeys.new_key("default", "old", "", None, {}, principal="user:carol")
    old_key = msgspec.structs.replace(old_key, created_at=stamp)
    new_key, _ = apikeys.new_key("default", "new", "", None, {}, principal="user:carol")
    # Keys made before IAM name the admin by name and predate its bootstrap: they keep working.
    legacy_admin, admin_token = apikeys.new_key("default", "legacy", "", None, {}, principal="user:admin")
    legacy_admin = msgspec.structs.replace(legacy_admin, created_at=stamp)
    await store.commit(Txn([Create(old_key), Create(new_key), Create(legacy_admin)]))
    assert await principals.upgrade_refs(store) >= 3
    assert await store.get("apikey", old_key.id) is None
    assert (await store.get("apikey", new_key.id)).spec["principal"] == f"user:{carol['id']}"
    assert (await store.get("apikey", legacy_admin.id)).spec["principal"] == principals.ADMIN_REF
    assert await principals.upgrade_refs(store) == 0  # idempotent
    assert (await api.client.get("/v1/users", headers=bearer(admin_token))).status == 200
    assert (await api.client.get("/v1/keypairs", headers=bearer(old_token))).status == 401


async def test_a_project_owner_cannot_revoke_a_cluster_admins_key_in_its_project(api):
    assert (await api.post("/v1/projects", json={"name": "p1"})).status == 201
    await _user(api, "olga")
    await _grant(api, "user:olga", "owner", "p1")
    olga = await _key(api, "olga", "p1")
    admin_key = await api.post("/v1/apikeys?project=p1", json={"name": "admin-in-p1"})
    await _user(api, "mike")
    await _grant(api, "user:mike", "member", "p1")
    mike_key = await api.post("/v1/apikeys?project=p1", json={"name": "mike-key", "user": "mike"})

    refused = await api.client.delete("/v1/apikeys/admin-in-p1?project=p1", headers=bearer(olga))
    assert refused.status == 403, await refused.text()
    assert "cluster administrator" in (await refused.json())["detail"]
    admin_secret = (await admin_key.json())["secret"]
    assert (await api.client.get("/v1/users", headers=bearer(admin_secret))).status == 200  # still works
    # Her project's other keys are hers to revoke, and the admin may revoke its own.
    assert (await api.client.delete("/v1/apikeys/mike-key?project=p1", headers=bearer(olga))).status == 204
    assert (await mike_key.json())["name"] == "mike-key"
    assert (await api.delete("/v1/apikeys/admin-in-p1?project=p1")).status == 204
