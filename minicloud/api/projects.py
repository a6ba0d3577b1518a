"""``/v1/projects``: the tenancy boundary. Every resource lives in one project (``default`` unless
``?project=NAME`` says otherwise); names repeat freely across projects."""

from __future__ import annotations

import contextlib

import msgspec
from aiohttp import web

from minicloud import errors, ids
from minicloud.api import resources as res
from minicloud.api.keys import STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.iam import tenancy
from minicloud.iam.directory import BINDING_KIND
from minicloud.model import Page, Project, ProjectCreate, ProjectUpdate
from minicloud.state import Delete, Record, Txn, TxnFailed, Update

routes = Routes("projects")


def view(r: Record) -> Project:
    return Project(**r.common_fields(), description=r.spec.get("description", ""))


KIND = res.register_kind(res.Kind(res.PROJECT_KIND, "projects", "prj", view, "project", cluster_level=True))


@routes.get("/v1/projects", query=res.ListQuery, response=Page[Project], auth=Action("iam:projects:list"))
async def list_projects(request: web.Request, query: res.ListQuery) -> Page[Project]:
    """List projects."""
    return await res.list_page(request, KIND, query)


@routes.post("/v1/projects", body=ProjectCreate, response=Project, status=201, auth=Action("iam:projects:create"))
async def create_project(request: web.Request, body: ProjectCreate) -> Reply:
    """Create a project."""
    if body.name == res.DEFAULT_PROJECT:
        raise errors.AlreadyExists("the project 'default' always exists")
    record = res.new_record(KIND, request, body.name, body.labels, {"description": body.description})
    return await res.create(request, KIND, record)


@routes.get("/v1/projects/{ref}", response=Project, auth=Action("iam:projects:get"))
async def show_project(request: web.Request) -> Reply:
    """Show a project."""
    return await res.show(request, KIND)


@routes.patch("/v1/projects/{ref}", body=ProjectUpdate, response=Project, auth=Action("iam:projects:update"))
async def update_project(request: web.Request, body: ProjectUpdate) -> Reply:
    """Change a project's description or labels."""
    return await res.update_description_labels(request, KIND, body)


@routes.delete("/v1/projects/{ref}", status=204, auth=Action("iam:projects:delete"))
async def delete_project(request: web.Request) -> Reply:
    """Delete an empty project and, in the same transaction, its role bindings. `default` cannot be deleted.

    Race-free (`minicloud/iam/tenancy.py`): the project is first marked `deleting` (creates in it are refused from
    then on, and those already in flight fail their Check on its revision), then checked empty, then deleted with its
    bindings in one transaction conditional on that marked revision; if it is not empty it is marked active again."""
    if request.match_info["ref"] == res.DEFAULT_PROJECT:
        raise errors.Conflict("the project 'default' always exists and cannot be deleted")
    record = await res.resolve(request, KIND)
    expect = res.if_match(request)
    if expect is not None and expect != record.revision:
        raise errors.PreconditionFailed(
            "the project was changed since the revision you sent in If-Match; read it again and retry"
        )
    store = request.app[STORE]
    marked = msgspec.structs.replace(record, status={**record.status, "state": tenancy.DELETING}, updated_at=ids.now())
    try:
        revision, _ = await store.commit(Txn([Update(marked, expect_revision=record.revision)]))
    except TxnFailed:
        raise errors.Conflict(f"project '{record.name}' changed while it was being deleted; retry") from None
    marked = msgspec.structs.replace(marked, revision=revision)
    try:
        for kind in res.KINDS.values():
            if not kind.cluster_level and await store.list(kind.name, project=record.name, limit=1):
                raise errors.Conflict(
                    f"project '{record.name}' still holds {kind.plural}; delete them first "
                    f"(`minicloud --project {record.name} {kind.cli_noun} list`)"
                )
        bindings = [
            Delete(kind=b.kind, id=b.id, expect_revision=b.revision)
            for b in await store.list(BINDING_KIND, limit=100_000)
            if b.spec.get("project_id") == record.id
        ]
        return await res.write(
            request,
            [Delete(kind=record.kind, id=record.id, expect_revision=revision), *bindings],
            status=204,
            kind_name=KIND.name,
            respond=lambda rev: None,
        )
    except BaseException:
        active = msgspec.structs.replace(marked, status={**record.status, "state": "active"}, updated_at=ids.now())
        with contextlib.suppress(TxnFailed, errors.MinicloudError):
            await store.commit(Txn([Update(active, expect_revision=revision)]))
        raise
