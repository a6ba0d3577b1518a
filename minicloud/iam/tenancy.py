"""Projects as a race-free tenancy boundary: nothing is created in a project that is being deleted.

Deleting a project (``api/projects.py``) is three steps: mark it ``deleting`` (a compare-and-swap, which changes its
revision), check that it holds nothing, then delete it together with its role bindings in one transaction (or mark it
active again). Every create of a project-scoped record commits with a :class:`~minicloud.state.Check` on its
project's revision (:func:`guards`, called by the write layer), so a create that read the project before it was
marked fails its Check, and one that reads it afterwards is refused: no record can slip into a project between the
emptiness check and the delete. The ``default`` project has no record and cannot be deleted, so it needs no guard.
"""

from __future__ import annotations

from typing import Any

from minicloud import errors
from minicloud.core.kinds import Obj
from minicloud.iam.kinds import PROJECT, ProjectSpec, ProjectStatus
from minicloud.state import Check, Create, Op, Record, Store, TxnFailed

PROJECT_KIND = PROJECT.name
DEFAULT_PROJECT = "default"
DELETING = "deleting"


async def project_id_of(store: Store, name: str) -> str | None:
    """The id of the project named ``name`` now (``default`` has a fixed id and no record); None when there is none.
    The one name-to-id lookup for whatever keys data by project id (S3 tenants, metrics scopes)."""
    if name == DEFAULT_PROJECT:
        from minicloud.iam.principals import DEFAULT_PROJECT_ID

        return DEFAULT_PROJECT_ID
    record = await store.get_by_name(PROJECT_KIND, "", name)
    return record.id if record is not None else None


def is_deleting(project: Record | Obj[ProjectSpec, ProjectStatus] | Any) -> bool:
    """True while ``project`` (a record or a typed project) is being deleted."""
    obj = PROJECT.load(project) if isinstance(project, Record) else project
    return bool(obj.status.state == DELETING)


async def guards(store: Store, ops: list[Op]) -> list[Check]:
    """A Check on the current revision of every project that ``ops`` create records in. Raises 409 when such a
    project is being deleted and 404 when it is gone."""
    names = sorted(
        {op.record.project for op in ops if isinstance(op, Create) and op.record.project not in ("", DEFAULT_PROJECT)}
    )
    checks = []
    for name in names:
        project = await store.get_by_name(PROJECT_KIND, "", name)
        if project is None:
            raise errors.NotFound(f"no project named '{name}'; see `minicloud project list`")
        if is_deleting(project):
            raise errors.Conflict(f"project '{name}' is being deleted; nothing was created in it")
        checks.append(Check(kind=PROJECT_KIND, id=project.id, expect_revision=project.revision))
    return checks


def refused(exc: TxnFailed) -> errors.MinicloudError | None:
    """The problem for a transaction that failed on a project guard (None: it failed for another reason)."""
    op = exc.op
    if isinstance(op, Check) and op.kind == PROJECT_KIND:
        return errors.Conflict(
            "the project was being deleted (or changed) while this request ran; nothing was created. "
            "Check `minicloud project list` and retry"
        )
    return None
