"""IAM's services without HTTP: typed kinds load old records, and every change commits with its audit entry."""

from __future__ import annotations

import msgspec
import pytest

from minicloud import errors
from minicloud.core.context import Context
from minicloud.iam import apikeys, bindings, logins, projects, roles, users
from minicloud.iam.directory import Directory
from minicloud.iam.kinds import APIKEY, PROJECT, ROLEBINDING, SESSION, USER, UserSpec
from minicloud.iam.ratelimit import LoginThrottle
from minicloud.iam.sessions import SessionKey
from minicloud.model import ApiKeyCreate, LoginRequest, ProjectCreate, RoleBindingCreate, UserCreate
from minicloud.state import SQLiteStore


@pytest.fixture
async def store(tmp_path):
    s = SQLiteStore(tmp_path / "state.db", retain_changes=1000)
    await s.open()
    await users.bootstrap_admin(s, "2026-01-01T00:00:00.000Z")
    yield s
    await s.close()


def ctx(project: str = "default") -> Context:
    return Context.system("test", project=project)


async def audited(store: SQLiteStore) -> list[str]:
    return [r.spec["action"] for r in await store.list("audit", project=None, limit=1000)]


def test_old_records_load_with_defaults():
    record = USER.dump(USER.new(project="", name="old", spec=UserSpec()))
    record.spec = {"type": "serviceaccount"}  # written before email and passwords
    user = USER.load(record)
    assert (user.spec.type, user.spec.email, user.spec.password_hash) == ("serviceaccount", "", None)
    old_key = msgspec.structs.replace(record, kind="apikey", spec={"hash": "h", "prefix": "mc_x"})
    assert APIKEY.load(old_key).spec.principal == "user:usr-admin"  # keys from before IAM act as the admin


async def test_deleting_a_user_revokes_its_keys_and_bindings_in_one_audited_change(store):
    directory = Directory(store)
    await users.create_user(ctx(), store, UserCreate(name="eve"))
    await bindings.grant_role(
        ctx(), store, directory, RoleBindingCreate(role="member", principal="user:eve", scope_project="default")
    )
    key = await apikeys.create_apikey(ctx(), store, directory, ApiKeyCreate(user="eve"))
    assert key.status == 201 and key.body.secret.startswith("mc_") and key.body.name.startswith("eve-")
    await users.delete_user(ctx(), store, "eve")
    assert await store.get(APIKEY.name, key.body.id) is None
    assert [b.spec["principal"] for b in await store.list(ROLEBINDING.name, limit=10)] == ["user:usr-admin"]
    assert (await audited(store))[-1] == "system:test"
    with pytest.raises(errors.Conflict):
        await users.delete_user(ctx(), store, "admin")


async def test_project_delete_takes_its_bindings_and_refuses_a_project_with_contents(store):
    directory = Directory(store)
    await projects.create_project(ctx(), store, ProjectCreate(name="p1"))
    await users.create_user(ctx(), store, UserCreate(name="bob"))
    await bindings.grant_role(
        ctx("p1"), store, directory, RoleBindingCreate(role="owner", principal="user:bob", scope_project="p1")
    )
    await apikeys.create_apikey(ctx("p1"), store, directory, ApiKeyCreate(name="k", user="bob"))
    with pytest.raises(errors.Conflict, match="still holds apikeys"):
        await projects.delete_project(ctx(), store, "p1", contents=[("apikey", "apikeys", "apikey")])
    record = await store.get_by_name(PROJECT.name, "", "p1")
    assert PROJECT.load(record).status.state == "active"  # marked active again
    await apikeys.delete_apikey(ctx("p1"), store, directory, "k")
    await projects.delete_project(ctx(), store, "p1", contents=[("apikey", "apikeys", "apikey")])
    assert await store.get_by_name(PROJECT.name, "", "p1") is None
    assert [b.spec["role"] for b in await store.list(ROLEBINDING.name, limit=10)] == ["admin"]


async def test_custom_role_lifecycle_and_login(store):
    directory = Directory(store)
    info = await roles.create_role(ctx(), store, roles.RoleCreate(name="reader", allow=["compute:*:get"]))
    assert info.body.name == "reader" and not info.body.builtin
    assert "reader" in [r.name for r in await roles.list_roles(directory)]
    await users.create_user(ctx(), store, UserCreate(name="ann", password="a long enough passphrase 42"))
    await bindings.grant_role(
        ctx(), store, directory, RoleBindingCreate(role="reader", principal="user:ann", scope_project="default")
    )
    with pytest.raises(errors.Conflict, match="still bound"):
        await roles.delete_role(ctx(), store, "reader")
    throttle, key = LoginThrottle(), SessionKey.generate()
    with pytest.raises(errors.Unauthenticated):
        await logins.login(ctx(), store, throttle, key, LoginRequest(user="ann", password="wrong"))
    session = await logins.login(
        ctx(), store, throttle, key, LoginRequest(user="ann", password="a long enough passphrase 42")
    )
    record = await store.get(SESSION.name, session.body.session_id)
    assert SESSION.load(record).spec.principal == session.body.principal
    await logins.logout(ctx(), store, session.body.session_id)
    assert await logins.logout(ctx(), store, session.body.session_id) is None  # already revoked: no error
