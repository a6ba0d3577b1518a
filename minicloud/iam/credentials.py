"""Who a new credential (API key, access key) acts as, and who may revoke one.

- A credential acts as a user or service account, referenced by id. Making one for someone else is user
  administration (``iam:users:update`` cluster-wide); the caller's own is allowed by the route's action.
- Revoking a credential of another principal that holds a cluster-wide role needs cluster administration too: a
  project owner may revoke its project's keys, but not an admin's key that happens to sit in the project.
"""

from __future__ import annotations

from minicloud import errors
from minicloud.core.context import Context
from minicloud.iam import principals
from minicloud.iam.directory import Directory, authorize
from minicloud.iam.kinds import ADMIN_ID, USER
from minicloud.state import Check, Store

#: What acting for, or over, another principal's credentials takes: user administration.
ADMINISTER = "iam:users:update"


async def owner_of_new(
    ctx: Context, store: Store, directory: Directory, user: str | None
) -> tuple[principals.User, Check]:
    """The user a new credential acts as — ``user`` (name, id, ``user:…``) or else the caller (local root and the
    platform: the built-in admin) — and a Check that the user is unchanged when the credential commits, so a
    credential created while its user is being deleted fails instead of outliving it."""
    caller = ctx.principal
    if user is not None:
        owner = await principals.find_user(store, user)
        if owner is None:
            raise errors.NotFound(f"no user named '{user}'; create it with `minicloud user create {user}`")
        if principals.ref_of(owner) != caller.ref:  # credentials for someone else: user administration
            await authorize(directory, caller, ADMINISTER, "", cluster=True)
    else:
        _, caller_id = principals.split_ref(caller.ref)
        own_id = caller_id if caller_id.startswith(principals.USER_ID_PREFIX) else ADMIN_ID
        record = await store.get(USER.name, own_id)
        if record is None:
            raise errors.NotFound("your user no longer exists; nothing was created")
        owner = USER.load(record)
    return owner, Check(kind=USER.name, id=owner.id, expect_revision=owner.revision)


async def may_revoke(ctx: Context, store: Store, directory: Directory, owner: str, name: str, what: str) -> None:
    """Raise 403 unless ``ctx``'s caller may revoke the credential ``name`` of ``owner`` (a principal ref): its own
    principal, an admin caller (local root), a cluster administrator, or — when the owner holds no cluster-wide
    role — whoever the route's action allowed."""
    caller = ctx.principal
    if caller.admin or owner == caller.ref:
        return
    bindings, _ = await directory.load()
    if not any(b.principal == owner and b.project is None for b in bindings):
        return
    decision = await directory.decide(caller.ref, ADMINISTER, None)
    if not decision.allowed:
        user = await principals.user_of_ref(store, owner)
        shown = f"{owner} ({user.name})" if user is not None else owner
        raise errors.Forbidden(
            f"{what} '{name}' belongs to {shown}, who holds cluster-wide roles: only they or a cluster "
            "administrator may revoke it",
            action=ADMINISTER,
        )
