"""Principals are named by id: ``user:usr-…`` or ``serviceaccount:usr-…`` (``local:root`` for the root socket).

API keys, sessions, S3 access keys and role bindings store that reference, never the user's name, so a user deleted
and another created under the same name share nothing. Deleting a user deletes every credential and binding that
references it in the same transaction (:func:`revocation_ops`); authentication also requires the referenced user to
exist, so a credential that escaped that sweep (created concurrently) authenticates no one.

Databases written before identities were ids hold name references (``user:alice``) and bindings without project ids;
:func:`upgrade_refs` rewrites them once at start-up, through ordinary transactions, so it works on both store
backends (what it cannot resolve — the credential of a user already deleted — it deletes: that is the defect).
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from minicloud.core.kinds import Kind, Obj
from minicloud.iam.kinds import ACCESSKEY, ADMIN_ID, ADMIN_REF, APIKEY, PROJECT, ROLEBINDING, SESSION, USER, UserSpec
from minicloud.state import Delete, Op, Record, Store, Txn, TxnFailed, Update

log = logging.getLogger(__name__)

USER_KIND = USER.name
BINDING_KIND = ROLEBINDING.name
PROJECT_KIND = PROJECT.name
__all__ = ["ADMIN_ID", "ADMIN_REF"]
#: The ``default`` project has no record; bindings to it carry this fixed project id.
DEFAULT_PROJECT = "default"
DEFAULT_PROJECT_ID = "prj-default"
#: Kinds that hold credentials of a principal (``spec.principal``).
CREDENTIAL_KINDS = (APIKEY.name, ACCESSKEY.name, SESSION.name)
_CREDENTIALS: tuple[Kind[Any, Any], ...] = (APIKEY, ACCESSKEY, SESSION, ROLEBINDING)
USER_ID_PREFIX = "usr-"

User = Obj[UserSpec, Any]


def ref_of(user: Record | Obj[UserSpec, Any]) -> str:
    """The reference credentials and bindings store for ``user``: ``<type>:<id>``."""
    obj = USER.load(user) if isinstance(user, Record) else user
    return f"{obj.spec.type}:{obj.id}"


def split_ref(ref: str) -> tuple[str, str]:
    """(kind, id-or-name) of a reference such as ``user:usr-abc``."""
    kind, _, rest = ref.partition(":")
    return kind, rest


async def find_user(store: Store, text: str) -> User | None:
    """The user or service account ``text`` names: ``NAME``, ``usr-ID``, ``user:NAME``, ``user:usr-ID``,
    ``serviceaccount:…``. An id wins over a name; a ``kind:`` prefix must match the record's type."""
    kind: str | None
    kind, sep, rest = text.partition(":")
    if not sep:
        kind, rest = None, text
    record = await store.get(USER_KIND, rest) if rest.startswith(USER_ID_PREFIX) else None
    if record is None and rest:
        record = await store.get_by_name(USER_KIND, "", rest)
    user = USER.load(record) if record is not None else None
    if user is not None and kind is not None and user.spec.type != kind:
        return None
    return user


async def user_of_ref(store: Store, ref: str) -> User | None:
    """The user an id reference names (None when it is gone or the reference is not by id)."""
    kind, user_id = split_ref(ref)
    if not user_id.startswith(USER_ID_PREFIX):
        return None
    record = await store.get(USER_KIND, user_id)
    user = USER.load(record) if record is not None else None
    if user is None or user.spec.type != kind:
        return None
    return user


async def _all(store: Store, kind: Kind[Any, Any]) -> list[Obj[Any, Any]]:
    out: list[Obj[Any, Any]] = []
    after = None
    while True:
        page = await store.list(kind.name, after=after, limit=1000)
        out += [kind.load(r) for r in page]
        if len(page) < 1000:
            return out
        after = (page[-1].name, page[-1].id)


async def revocation_ops(store: Store, ref: str) -> list[Op]:
    """Deletes of every credential and role binding of ``ref`` (each a compare-and-swap on what was read), to
    commit with the user's own delete. Scans the credential kinds: user deletion is rare, requests never do this."""
    ops: list[Op] = []
    for kind in _CREDENTIALS:
        ops += [
            Delete(kind=r.kind, id=r.id, expect_revision=r.revision)
            for r in await _all(store, kind)
            if r.spec.principal == ref
        ]
    return ops


async def upgrade_refs(store: Store) -> int:
    """Rewrite name references (``user:alice``) in credentials and bindings to id references, and give bindings
    their project's id; delete those whose user or project no longer exists. Idempotent (a database already
    upgraded costs one scan of these kinds); returns how many records it changed. A record changed concurrently is
    left for the next start."""
    users = await _all(store, USER)
    by_id = {u.id: u for u in users}
    by_name = {u.name: u for u in users}
    project_records = await _all(store, PROJECT)
    projects = {p.name: p.id for p in project_records}
    project_created = {p.id: p.created_at for p in project_records}
    projects[DEFAULT_PROJECT] = DEFAULT_PROJECT_ID
    project_ids = set(projects.values())
    ops: list[Op] = []
    for kind in _CREDENTIALS:
        for r in await _all(store, kind):
            # An API key without a principal predates IAM: it acts as the built-in admin (the spec's default).
            pkind, rest = split_ref(r.spec.principal)
            user = by_id.get(rest)
            if user is None and rest == "admin" and pkind == "user":
                user = by_id.get(ADMIN_ID)  # the built-in admin (never deleted; keys made before IAM act as it)
            if user is None:
                user = by_name.get(rest)
                # Made before this user existed: it belonged to an earlier user of the same name (the defect).
                if user is not None and r.created_at < user.created_at:
                    user = None
            if user is None or user.spec.type != pkind:
                ops.append(Delete(kind=r.kind, id=r.id, expect_revision=r.revision))
                continue
            spec = msgspec.structs.replace(r.spec, principal=ref_of(user))
            if kind is ROLEBINDING and spec.project is not None:
                pid = spec.project_id
                if pid is None:
                    pid = projects.get(spec.project)
                    # A binding older than its project was made for an earlier project of that name.
                    if pid is not None and r.created_at < project_created.get(pid, ""):
                        pid = None
                if pid is None or pid not in project_ids:
                    ops.append(Delete(kind=r.kind, id=r.id, expect_revision=r.revision))
                    continue
                spec = msgspec.structs.replace(spec, project_id=pid)
            if spec != r.spec:
                ops.append(Update(kind.dump(r.replace(spec=spec)), expect_revision=r.revision))
    changed = 0
    for start in range(0, len(ops), 200):
        batch = ops[start : start + 200]
        try:
            await store.commit(Txn(batch))
            changed += len(batch)
        except TxnFailed:
            for op in batch:  # one changed meanwhile: do the others one by one
                try:
                    await store.commit(Txn([op]))
                    changed += 1
                except TxnFailed:
                    pass
    if changed:
        log.warning("IAM references upgraded from names to ids", extra={"records": changed})
    return changed
