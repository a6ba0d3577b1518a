"""Users and service accounts: the services behind ``/v1/users`` (list and show are generic)."""

from __future__ import annotations

import asyncio

from minicloud import errors
from minicloud.core import crud
from minicloud.core.context import Context
from minicloud.core.write import Written
from minicloud.iam import passwords, principals
from minicloud.iam.bindings import binding_id
from minicloud.iam.kinds import ADMIN_ID, ADMIN_REF, ROLEBINDING, USER, RoleBindingSpec, UserSpec
from minicloud.model import UserCreate
from minicloud.state import Create, Store, Txn, TxnFailed


async def create_user(ctx: Context, store: Store, body: UserCreate) -> Written:
    """Create a user (with an optional password, checked against the policy and hashed with scrypt off the event
    loop) or a service account (never a password). 409 when the name is taken."""
    if body.name.startswith(principals.USER_ID_PREFIX):
        raise errors.ValidationFailed(
            f"user names may not start with '{principals.USER_ID_PREFIX}' (that is how user ids start); choose another",
            invalid_params=[{"name": "name", "reason": "looks like a user id"}],
        )
    spec = UserSpec(type=body.type, email=body.email)
    if body.password is not None:
        if body.type == "serviceaccount":
            raise errors.ValidationFailed(
                "service accounts have no password; give them API keys (`minicloud apikey create --user NAME`)",
                invalid_params=[{"name": "password", "reason": "not allowed for service accounts"}],
            )
        passwords.check_password_policy(body.password)
        spec.password_hash = await asyncio.to_thread(passwords.hash_password, body.password)
    user = USER.new(project="", name=body.name, spec=spec, labels=body.labels, stamp=ctx.clock())
    return await crud.create(ctx, store, USER, user)


async def delete_user(ctx: Context, store: Store, ref: str, *, expect: int | None = None) -> Written:
    """Delete a user or service account and, in the same transaction, every API key, session, access key and role
    binding of theirs: nothing they held works any more, and a new user of the same name inherits nothing. The
    built-in admin cannot be deleted (409)."""
    user = await crud.get(ctx, store, USER, ref)
    if user.id == ADMIN_ID:
        raise errors.Conflict(
            "the built-in admin user cannot be deleted; revoke its API keys (`minicloud apikey delete NAME`) instead"
        )
    revocations = await principals.revocation_ops(store, principals.ref_of(user))
    return await crud.delete_obj(ctx, store, USER, user, expect=expect, extra=revocations)


async def bootstrap_admin(store: Store, stamp: str) -> bool:
    """Make sure the ``admin`` user exists and holds the ``admin`` role cluster-wide (what `minicloud init`'s API key
    acts as). Idempotent; fixed ids make concurrent bootstraps on several nodes converge. True if it wrote.

    A start-up step of every node (like a migration), not a change anyone requested: it is not audited."""
    if await store.get_by_name(USER.name, "", "admin") is not None:
        return False
    user = USER.new(project="", name="admin", spec=UserSpec(type="user"), id=ADMIN_ID, stamp=stamp)
    grant_id = binding_id(ADMIN_REF, "admin", None)
    spec = RoleBindingSpec(principal=ADMIN_REF, principal_name="admin", role="admin", project=None)
    grant = ROLEBINDING.new(project="", name=grant_id, spec=spec, id=grant_id, stamp=stamp)
    try:
        await store.commit(Txn([Create(USER.dump(user)), Create(ROLEBINDING.dump(grant))]))
    except (TxnFailed, errors.MinicloudError):
        return False  # another node did it, or no quorum now: the next start tries again
    return True
