"""``GET /v1/whoami``: who the caller is on this node, which roles it holds, and which credential it used.

Any authenticated principal may call it (it is what ``minicloud remote add`` checks a token with, so a project
member can add a remote); anonymous callers get 401. Principal fields come from the request's
:class:`~minicloud.api.auth.Principal`, never from parsing its ref.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from minicloud.api.auth import DIRECTORY, Principal, principal_of
from minicloud.api.keys import CONFIG, PKI, STORE
from minicloud.api.routing import AUTHENTICATED, Routes
from minicloud.iam import principals
from minicloud.iam.kinds import APIKEY, PROJECT, SESSION, USER
from minicloud.model import WhoAmI, WhoAmIBinding, WhoAmICredential

routes = Routes("auth")
#: The ``default`` project has no record; bindings that name projects by id name it so.
_DEFAULT_PROJECT_ID = principals.DEFAULT_PROJECT_ID


@routes.get("/v1/whoami", response=WhoAmI, auth=AUTHENTICATED)
async def whoami(request: web.Request) -> WhoAmI:
    """Who am I: the calling principal, its role bindings and the credential in use."""
    principal = principal_of(request)
    store = request.app[STORE]
    common = {"node": request.app[CONFIG].node_name, "ca_fingerprint": request.app[PKI].ca_fingerprint}
    if principal.kind == "local":
        return WhoAmI(
            principal=principal.ref,
            kind="local",
            name=principal.name,
            admin=True,
            credential=WhoAmICredential(type="socket"),
            **common,
        )
    user = await _user_record(store, principal)
    bindings, _roles = await request.app[DIRECTORY].load()
    mine = sorted(
        {(b.role, await _project_name(store, b.project)) for b in bindings if b.principal == principal.ref},
        key=lambda rb: (rb[1] is not None, rb[1] or "", rb[0]),
    )
    return WhoAmI(
        principal=principal.ref,
        kind="serviceaccount" if principal.kind == "serviceaccount" else "user",
        id=user.id if user is not None else getattr(principal, "id", None),
        name=user.name if user is not None else principal.name,
        admin=any(role == "admin" and project is None for role, project in mine),
        bindings=[WhoAmIBinding(role=role, project=project) for role, project in mine],
        projects=sorted({project for _role, project in mine if project is not None}),
        credential=await _credential(store, principal),
        **common,
    )


async def _user_record(store: Any, principal: Principal) -> principals.User | None:
    """The principal's user, whether the principal carries its id or (older credentials) its name."""
    for candidate in (getattr(principal, "id", None), principal.name):
        if candidate:
            record = await store.get(USER.name, candidate)
            if record is not None:
                return USER.load(record)
    record = await store.get_by_name(USER.name, "", principal.name)
    return USER.load(record) if record is not None else None


async def _project_name(store: Any, ref: str | None) -> str | None:
    """A binding's project by name, whether the binding names it by id or by name (null: cluster-wide)."""
    if ref is None:
        return None
    if ref == _DEFAULT_PROJECT_ID:
        return "default"
    record = await store.get(PROJECT.name, ref)
    return record.name if record is not None else ref


async def _credential(store: Any, principal: Principal) -> WhoAmICredential:
    if principal.session_id is not None:
        record = await store.get(SESSION.name, principal.session_id)
        expires = (SESSION.load(record).spec.expires_at or None) if record is not None else None
        return WhoAmICredential(type="session", id=principal.session_id, expires_at=expires)
    record = await store.get(APIKEY.name, principal.key_id) if principal.key_id else None
    key = APIKEY.load(record) if record is not None else None
    return WhoAmICredential(
        type="apikey",
        id=principal.key_id,
        name=key.name if key is not None else None,
        expires_at=key.spec.expires_at if key is not None else None,
    )
