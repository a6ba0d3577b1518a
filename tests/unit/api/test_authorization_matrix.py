"""Every registered route x {anonymous, viewer, member, owner of another project, admin}.

The expectations come from this file's own table of what each built-in role may do, not from the policy code.
A route added without an authorisation declaration fails ``test_every_route_declares_its_authorisation``; a route
whose action the roles below do not treat as expected fails here.
"""

from __future__ import annotations

import re

from minicloud.api.keys import STORE
from minicloud.api.openapi import app_specs
from minicloud.api.routing import Action, Authenticated
from minicloud.iam import apikeys
from minicloud.state import Create, Txn

#: Services members change; ``billing`` is a project service they (and owners) only read: prices and invoice
#: close are admins'.
MEMBER_SERVICES = {"compute", "storage", "network", "operations", "events", "metrics"}
PROJECT_SERVICES = {*MEMBER_SERVICES, "billing"}
PROJECT_IAM = ("iam:apikeys:", "iam:bindings:", "iam:accesskeys:", "iam:serviceaccounts:")
READS = {"get", "list", "watch"}


def project_action(action: str) -> bool:
    return action.split(":")[0] in PROJECT_SERVICES or action.startswith(PROJECT_IAM)


def expected(persona: str, action: str) -> str:
    """'allowed', 'denied' (403), 'hidden' (404) or 'unauthenticated' (401)."""
    if persona == "anonymous":
        return "unauthenticated"
    if persona == "admin":
        return "allowed"
    if not project_action(action):
        return "denied"  # cluster administration: only cluster-wide admins
    if persona == "owner-of-p2":
        return "hidden"  # no role in p1: p1's resources do not exist for them
    service, verb = action.split(":")[0], action.split(":")[-1]
    if persona == "viewer":
        return "allowed" if verb in READS else "denied"
    assert persona == "member"
    if service in MEMBER_SERVICES:
        return "allowed"
    return "allowed" if verb in READS else "denied"


def outcome(status: int) -> str:
    return {401: "unauthenticated", 403: "denied"}.get(status, "allowed")


async def _persona_token(api, name: str, role: str, project: str) -> str:
    user = await api.post("/v1/users", json={"name": name})
    assert user.status == 201
    grant = {"role": role, "principal": f"user:{name}", "scope_project": project}
    assert (await api.post(f"/v1/rolebindings?project={project}", json=grant)).status == 201, name
    record, token = apikeys.new_key(project, f"{name}-key", "", None, {}, principal=f"user:{(await user.json())['id']}")
    await api.app[STORE].commit(Txn([Create(record)]))
    return token


async def test_every_route_answers_every_persona_as_its_role_allows(api):
    for project in ("p1", "p2"):
        assert (await api.post("/v1/projects", json={"name": project})).status == 201
    tokens = {
        "viewer": await _persona_token(api, "vera", "viewer", "p1"),
        "member": await _persona_token(api, "mike", "member", "p1"),
        "owner-of-p2": await _persona_token(api, "olga", "owner", "p2"),
        "admin": api.token,
        "anonymous": None,
    }
    mismatches = []
    checked = 0
    for spec in app_specs(api.app):
        if isinstance(spec.auth, Authenticated):
            resp = await api.request(spec.method, re.sub(r"{\w+}", "x", spec.path), anon=True)
            assert resp.status == 401, f"{spec.method} {spec.path} needs credentials but answered {resp.status}"
            continue
        if not isinstance(spec.auth, Action):
            resp = await api.request(spec.method, re.sub(r"{\w+}", "x", spec.path), anon=True)
            assert resp.status not in (401, 403), f"public {spec.method} {spec.path} answered {resp.status}"
            continue
        path = re.sub(r"{\w+}", "x", spec.path) + "?project=p1"
        body = {"__probe__": 1} if spec.body is not None else None  # authorised callers stop at 422: no side effects
        for persona, token in tokens.items():
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            resp = await api.client.request(spec.method, path, json=body, headers=headers)
            want = expected(persona, spec.auth.name)
            got = outcome(resp.status)
            if want == "hidden":
                ok = resp.status == 404
            elif want == "allowed":
                ok = got == "allowed"
            else:
                ok = got == want
            if want in ("denied", "unauthenticated") and ok:
                problem = await resp.json()
                ok = problem["status"] == resp.status and (want != "denied" or spec.auth.name in problem["detail"] or
                                                          problem.get("action") == spec.auth.name)  # fmt: skip
            if not ok:
                mismatches.append(
                    f"{persona:12} {spec.method:6} {spec.path:40} {spec.auth.name:30} want {want}, got {resp.status}"
                )
            checked += 1
    assert not mismatches, "\n" + "\n".join(mismatches)
    assert checked >= 5 * 30


async def test_a_revoked_grant_stops_working_at_once(api):
    await api.post("/v1/projects", json={"name": "p1"})
    token = await _persona_token(api, "tim", "member", "p1")
    auth = {"Authorization": f"Bearer {token}"}
    assert (await api.client.get("/v1/keypairs?project=p1", headers=auth)).status == 200
    grants = (await (await api.get("/v1/rolebindings?principal=user:tim")).json())["items"]
    assert len(grants) == 1
    assert (await api.delete(f"/v1/rolebindings/{grants[0]['id']}")).status == 204
    assert (await api.client.get("/v1/keypairs?project=p1", headers=auth)).status == 404


async def test_project_owners_cannot_grant_cluster_wide_roles(api):
    await api.post("/v1/projects", json={"name": "p1"})
    token = await _persona_token(api, "oscar", "owner", "p1")
    auth = {"Authorization": f"Bearer {token}"}
    await api.post("/v1/users", json={"name": "eve"})
    grant = {"role": "admin", "principal": "user:eve", "scope_project": None}
    assert (await api.client.post("/v1/rolebindings?project=p1", json=grant, headers=auth)).status == 403
    in_project = {"role": "viewer", "principal": "user:eve", "scope_project": "p1"}
    assert (await api.client.post("/v1/rolebindings?project=p1", json=in_project, headers=auth)).status == 201
    elsewhere = {"role": "viewer", "principal": "user:eve", "scope_project": "default"}
    assert (await api.client.post("/v1/rolebindings?project=p1", json=elsewhere, headers=auth)).status in (403, 404)
