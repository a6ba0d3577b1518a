"""Passwords, sessions, API keys and rate limits: every refusal is a clear 401/429, and no secret reaches the logs."""

from __future__ import annotations

import logging
import time

from minicloud import logs
from minicloud.api.login import SESSION_KEY
from minicloud.iam import sessions
from tests.unit.api.conftest import make_config, start_api
from tests.unit.api.test_conventions import problem

PASSWORD = "correct horse battery staple"


def capture_everything(caplog) -> None:
    """Capture at DEBUG what the agent would log (with its library levels, as logs.setup sets them)."""
    caplog.set_level(logging.DEBUG)
    logs.quiet_libraries()


async def make_user(api, name="alice", password=PASSWORD):
    """Create the user with a password and make it a member of ``default``; returns the user."""
    resp = await api.post("/v1/users", json={"name": name, "password": password})
    assert resp.status == 201
    await api.post("/v1/rolebindings", json={"role": "member", "principal": f"user:{name}", "scope_project": "default"})
    return await resp.json()


async def login(api, user="alice", password=PASSWORD, **extra):
    return await api.post("/v1/auth/login", json={"user": user, "password": password, **extra}, anon=True)


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


async def test_login_issues_a_session_that_acts_as_the_user_until_logout(api, caplog):
    capture_everything(caplog)
    alice = await make_user(api)
    resp = await login(api)
    assert resp.status == 201
    session = await resp.json()
    assert session["principal"] == f"user:{alice['id']}" and session["token"].startswith("mcs1.")
    assert (await api.client.get("/v1/keypairs", headers=bearer(session["token"]))).status == 200
    created = await api.client.post(
        "/v1/keypairs", json={"name": "k", "public_key": "x"}, headers=bearer(session["token"])
    )  # a member may create (422: the key is bad, but authorisation passed)
    assert created.status == 422
    assert (await api.client.post("/v1/auth/logout", headers=bearer(session["token"]))).status == 204
    p = await problem(await api.client.get("/v1/keypairs", headers=bearer(session["token"])), 401)
    assert "revoked" in p["detail"]
    assert PASSWORD not in caplog.text and session["token"] not in caplog.text and "scrypt$" not in caplog.text


async def test_wrong_password_and_unknown_user_get_the_same_401(api, caplog):
    capture_everything(caplog)
    await make_user(api)
    wrong = await problem(await login(api, password="not the password at all"), 401)
    unknown = await problem(await login(api, user="mallory"), 401)
    assert wrong["detail"] == unknown["detail"]
    assert "not the password" not in caplog.text and PASSWORD not in caplog.text


async def test_repeated_failures_are_throttled_with_retry_after(api):
    await make_user(api)
    for _ in range(5):
        await problem(await login(api, password="guess guess guess"), 401)
    resp = await login(api)  # even the right password waits now
    await problem(resp, 429)
    assert int(resp.headers["Retry-After"]) >= 1


async def test_tampered_expired_and_replayed_tokens_are_refused(api):
    await make_user(api)
    token = (await (await login(api)).json())["token"]
    head, claims, sig = token.split(".")
    tampered = f"{head}.{claims[:-2]}{'A' if claims[-2] != 'A' else 'B'}{claims[-1]}.{sig}"
    await problem(await api.client.get("/v1/keypairs", headers=bearer(tampered)), 401)
    key = api.app[SESSION_KEY].key
    expired = sessions.issue(key, "user:alice", "ses-whatever", 60, now=time.time() - 3600)
    p = await problem(await api.client.get("/v1/keypairs", headers=bearer(expired)), 401)
    assert "expired" in p["detail"]
    await problem(await api.client.get("/v1/keypairs", headers=bearer(expired)), 401)  # a replay fares no better
    other = sessions.issue(sessions.SessionKey.generate(), "user:alice", "ses-x", 60)
    await problem(await api.client.get("/v1/keypairs", headers=bearer(other)), 401)


async def test_passwords_are_checked_and_never_returned(api):
    p = await problem(await api.post("/v1/users", json={"name": "bob", "password": "short"}), 422)
    assert p["invalid_params"][0]["name"] == "password"
    created = await (await api.post("/v1/users", json={"name": "bob", "password": PASSWORD})).json()
    listed = await (await api.get("/v1/users")).text()
    assert created["has_password"] is True and "scrypt" not in listed and PASSWORD not in listed
    await problem(await api.post("/v1/users", json={"name": "ci", "type": "serviceaccount", "password": PASSWORD}), 422)


async def test_requests_beyond_the_rate_limit_get_429(tmp_path):
    a = await start_api(make_config(tmp_path, rate_limit_rps=1.0, rate_limit_burst=3))
    try:
        statuses = [(await a.get("/v1/keypairs")).status for _ in range(6)]
        assert statuses[:3] == [200, 200, 200] and 429 in statuses[3:]
        limited = await a.get("/v1/keypairs")
        assert limited.status == 429 and int(limited.headers["Retry-After"]) >= 1
    finally:
        await a.client.close()


async def test_a_password_stored_with_old_parameters_is_rehashed_at_login(api):
    import msgspec

    from minicloud.api.keys import STORE
    from minicloud.iam import passwords
    from minicloud.state import Txn, Update
    from tests.unit.iam.test_passwords import scrypt_string

    await make_user(api, "olga")
    store = api.app[STORE]
    user = await store.get_by_name("user", "", "olga")
    weak = scrypt_string(PASSWORD, n=2**10)  # as if stored by an older release with a cheaper cost
    spec = {**user.spec, "password_hash": weak}
    await store.commit(Txn([Update(msgspec.structs.replace(user, spec=spec), expect_revision=user.revision)]))
    assert passwords.needs_rehash(weak)
    assert (await login(api, "olga")).status == 201
    stored = (await store.get_by_name("user", "", "olga")).spec["password_hash"]
    assert stored != weak and not passwords.needs_rehash(stored)
    assert (await login(api, "olga")).status == 201  # the new hash verifies
