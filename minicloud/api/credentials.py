"""Who a new credential (API key, access key) acts as, and who may revoke one.

- A credential acts as a user or service account, referenced by id. Making one for someone else is user
  administration (``iam:users:update`` cluster-wide); the caller's own is allowed by the route's action.
- Revoking a credential of another principal that holds a cluster-wide role needs cluster administration too: a
  project owner may revoke its project's keys, but not an admin's key that happens to sit in the project.
"""

from __future__ import annotations

from aiohttp import web

from minicloud import errors
from minicloud.api.auth import DIRECTORY, Principal, authorize, principal_of
from minicloud.api.keys import STORE
from minicloud.iam import principals
from minicloud.state import Check, Record

#: What acting for, or over, another principal's credentials takes: user administration.
ADMINISTER = "iam:users:update"


async def owner_of_new(request: web.Request, user: str | None) -> tuple[Record, Check]:
    """The user a new credential acts as — ``user`` (name, id, ``user:…``) or else the caller (local root: the
    built-in admin) — and a Check that the user is unchanged when the credential commits, so a credential
    created while its user is being deleted fails instead of outliving it."""
    caller = principal_of(request)
    store = request.app[STORE]
    if user is not None:
        record = await principals.find_user(store, user)
        if record is None:
            raise errors.NotFound(f"no user named '{user}'; create it with `minicloud user create {user}`")
        if principals.ref_of(record) != caller.ref:  # credentials for someone else: user administration
            await authorize(request, caller, ADMINISTER, "", cluster=True)
    else:
        record = await store.get(principals.USER_KIND, caller.id or principals.ADMIN_ID)
        if record is None:
            raise errors.NotFound("your user no longer exists; nothing was created")
    return record, Check(kind=record.kind, id=record.id, expect_revision=record.revision)


async def may_revoke(request: web.Request, credential: Record, what: str) -> None:
    """Raise 403 unless the caller may revoke ``credential``: its own principal, local root, a cluster
    administrator, or — when the owner holds no cluster-wide role — whoever the route's action allowed."""
    caller: Principal = principal_of(request)
    owner = credential.spec.get("principal", "")
    if caller.admin or owner == caller.ref:
        return
    bindings, _ = await request.app[DIRECTORY].load()
    if not any(b.principal == owner and b.project is None for b in bindings):
        return
    decision = await request.app[DIRECTORY].decide(caller.ref, ADMINISTER, None)
    if not decision.allowed:
        user = await principals.user_of_ref(request.app[STORE], owner)
        shown = f"{owner} ({user.name})" if user is not None else owner
        raise errors.Forbidden(
            f"{what} '{credential.name}' belongs to {shown}, who holds cluster-wide roles: only they or a cluster "
            "administrator may revoke it",
            action=ADMINISTER,
        )
