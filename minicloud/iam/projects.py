"""Projects, the tenancy boundary: the services behind ``/v1/projects`` (list, show and the description/labels
patch are generic). How deletion stays race-free is explained in :mod:`minicloud.iam.tenancy`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from minicloud import errors
from minicloud.core import crud
from minicloud.core.context import Context
from minicloud.core.kinds import public_kinds
from minicloud.core.write import Written
from minicloud.iam import tenancy
from minicloud.iam.kinds import PROJECT, ROLEBINDING, ProjectSpec, ProjectStatus
from minicloud.model import ProjectCreate
from minicloud.state import Delete, Op, Store, Txn, TxnFailed, Update


async def create_project(ctx: Context, store: Store, body: ProjectCreate) -> Written:
    """Create a project (409 for ``default``, which always exists, or a taken name)."""
    if body.name == tenancy.DEFAULT_PROJECT:
        raise errors.AlreadyExists("the project 'default' always exists")
    project = PROJECT.new(
        project="", name=body.name, spec=ProjectSpec(description=body.description), labels=body.labels,
        stamp=ctx.clock(),
    )  # fmt: skip
    return await crud.create(ctx, store, PROJECT, project)


def project_kinds() -> list[tuple[str, str, str]]:
    """(name, plural, CLI noun) of every declared public kind whose records live in a project."""
    return [(k.name, k.plural, k.noun or k.name) for k in public_kinds().values() if k.scope == "project"]


async def delete_project(
    ctx: Context,
    store: Store,
    ref: str,
    *,
    expect: int | None = None,
    contents: Iterable[tuple[str, str, str]] | None = None,
) -> Written:
    """Delete an empty project and, in the same transaction, its role bindings. ``default`` cannot be deleted (409).

    ``contents``: (kind, plural, noun) of every kind a project may hold (default: the declared public ones); a
    project holding any record of them is not empty (409 naming the kind and the command that lists them).

    Race-free: the project is first marked ``deleting`` (a compare-and-swap; creates in it are refused from then on,
    and those already in flight fail their Check on its revision), then checked empty, then deleted with its
    bindings in one transaction conditional on that marked revision; if it is not empty it is marked active again.
    The mark and the unmark are bookkeeping, not audited; the delete is."""
    if ref == tenancy.DEFAULT_PROJECT:
        raise errors.Conflict("the project 'default' always exists and cannot be deleted")
    project = await crud.get(ctx, store, PROJECT, ref)
    if expect is not None and expect != project.revision:
        raise errors.PreconditionFailed(
            "the project was changed since the revision you sent in If-Match; read it again and retry"
        )
    marked = project.replace(status=ProjectStatus(state=tenancy.DELETING), updated_at=ctx.clock())
    try:
        revision, _ = await store.commit(Txn([Update(PROJECT.dump(marked), expect_revision=project.revision)]))
    except TxnFailed:
        raise errors.Conflict(f"project '{project.name}' changed while it was being deleted; retry") from None
    marked = marked.replace(revision=revision)
    try:
        for kind, plural, noun in contents if contents is not None else project_kinds():
            if await store.list(kind, project=project.name, limit=1):
                raise errors.Conflict(
                    f"project '{project.name}' still holds {plural}; delete them first "
                    f"(`minicloud --project {project.name} {noun} list`)"
                )
        bindings: list[Op] = [
            Delete(kind=b.kind, id=b.id, expect_revision=b.revision)
            for b in map(ROLEBINDING.load, await store.list(ROLEBINDING.name, limit=100_000))
            if b.spec.project_id == project.id
        ]
        return await crud.delete_obj(ctx, store, PROJECT, marked, expect=revision, extra=bindings)
    except BaseException:
        active = marked.replace(status=ProjectStatus(state="active"), updated_at=ctx.clock())
        with contextlib.suppress(TxnFailed, errors.MinicloudError):
            await store.commit(Txn([Update(PROJECT.dump(active), expect_revision=revision)]))
        raise
