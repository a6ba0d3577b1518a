"""``GET /v1/whoami`` answers every kind of authenticated principal (and only them), with its roles and credential."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from tests.unit.api.test_conventions import problem

PASSWORD = "correct horse battery staple"


async def make_principal(api, name, *, role=None, project="p1", type="user", password=None, expires_in=None):
    """A user or service account, optionally bound to ``role`` in ``project``; returns (user id, API key secret)."""
    body = {"name": name, "type": type, **({"password": password} if password else {})}
    created = await api.post("/v1/users", json=body)
    assert created.status == 201, await created.text()
    user = await created.json()
    if role is not None:
        for ref in (f"{type}:{name}", f"{type}:{user['id']}"):  # by name today; by id once refs are ids
            resp = await api.post(
                f"/v1/rolebindings?project={project}", json={"role": role, "principal": ref, "scope_project": project}
            )
            if resp.status == 201:
                break
        assert resp.status == 201, await resp.text()
    key = {"name": f"{name}-key", "user": name, **({"expires_in": expires_in} if expires_in else {})}
    resp = await api.post(f"/v1/apikeys?project={project}", json=key)
    assert resp.status == 201, await resp.text()
    return user["id"], (await resp.json())["secret"]


async def whoami(api, token) -> dict:
    resp = await api.client.get("/v1/whoami", headers={"Authorization": f"Bearer {token}"})
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_anonymous_callers_get_401(api):
    p = await problem(await api.get("/v1/whoami", anon=True), 401)
    assert "Authorization" in p["detail"]


async def test_a_project_member_learns_who_it_is_though_it_may_not_read_the_node(api):
    assert (await api.post("/v1/projects", json={"name": "p1"})).status == 201
    uid, token = await make_principal(api, "mike", role="member", expires_in=3600)
    # What `remote add` used to check the token with: a member may not, so members could not add remotes.
    assert (await api.client.get("/v1/node", headers={"Authorization": f"Bearer {token}"})).status == 403
    me = await whoami(api, token)
    assert me["kind"] == "user" and me["name"] == "mike" and me["id"] == uid
    assert me["admin"] is False
    assert me["bindings"] == [{"role": "member", "project": "p1"}] and me["projects"] == ["p1"]
    cred = me["credential"]
    assert cred["type"] == "apikey" and cred["name"] == "mike-key" and cred["id"].startswith("ak")
    assert cred["expires_at"] and cred["expires_at"].endswith("Z")
    assert me["node"] == "n1" and me["ca_fingerprint"].startswith("sha256:")


async def test_a_viewer_and_a_service_account_see_their_own_roles(api):
    assert (await api.post("/v1/projects", json={"name": "p1"})).status == 201
    _, viewer = await make_principal(api, "vera", role="viewer")
    me = await whoami(api, viewer)
    assert me["bindings"] == [{"role": "viewer", "project": "p1"}] and me["admin"] is False
    assert me["credential"]["expires_at"] is None
    sid, robot = await make_principal(api, "ci", role="member", type="serviceaccount")
    me = await whoami(api, robot)
    assert me["kind"] == "serviceaccount" and me["name"] == "ci" and me["id"] == sid
    assert me["principal"].startswith("serviceaccount:")
    assert me["projects"] == ["p1"]


async def test_a_user_without_roles_may_still_ask(api):
    _, token = await make_principal(api, "nobody", project="default")
    me = await whoami(api, token)
    assert me["bindings"] == [] and me["projects"] == [] and me["admin"] is False


async def test_the_cluster_admin_is_admin_cluster_wide(api):
    me = await whoami(api, api.token)
    assert me["principal"] == "user:admin" or me["name"] == "admin"
    assert me["admin"] is True and {"role": "admin", "project": None} in me["bindings"]
    assert me["credential"]["type"] == "apikey"


async def test_a_login_session_names_its_session_and_expiry(api):
    assert (await api.post("/v1/projects", json={"name": "p1"})).status == 201
    await make_principal(api, "alice", role="owner", password=PASSWORD)
    resp = await api.post("/v1/auth/login", json={"user": "alice", "password": PASSWORD, "ttl": 600}, anon=True)
    session = await resp.json()
    me = await whoami(api, session["token"])
    assert me["name"] == "alice" and me["bindings"] == [{"role": "owner", "project": "p1"}]
    assert me["credential"] == {
        "type": "session",
        "id": session["session_id"],
        "name": None,
        "expires_at": session["expires_at"],
    }
    await api.client.post("/v1/auth/logout", headers={"Authorization": f"Bearer {session['token']}"})
    await problem(await api.client.get("/v1/whoami", headers={"Authorization": f"Bearer {session['token']}"}), 401)


async def test_local_root_on_the_socket(api, tmp_path):
    path = str(tmp_path / "api.sock")
    site = web.UnixSite(api.client.server.runner, path)
    await site.start()
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path)) as http:
        resp = await http.get("http://localhost/v1/whoami")
        assert resp.status == 200, await resp.text()
        me = await resp.json()
    assert me["principal"] == "local:root" and me["kind"] == "local" and me["admin"] is True
    assert me["credential"] == {"type": "socket", "id": None, "name": None, "expires_at": None}
