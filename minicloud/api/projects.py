"""``/v1/projects``: the tenancy boundary. Every resource lives in one project (``default`` unless
``?project=NAME`` says otherwise); names repeat freely across projects."""

from __future__ import annotations

from aiohttp import web

from minicloud import errors
from minicloud.api import resources as res
from minicloud.api.keys import STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.model import Page, Project, ProjectCreate, ProjectUpdate
from minicloud.state import Record

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
    """Delete an empty project."""
    record = await res.resolve(request, KIND)
    store = request.app[STORE]
    for kind in res.KINDS.values():
        if kind.name != KIND.name and await store.list(kind.name, project=record.name, limit=1):
            raise errors.Conflict(
                f"project '{record.name}' still holds {kind.plural}; delete them first "
                f"(`minicloud --project {record.name} {kind.cli_noun} list`)"
            )
    return await res.delete(request, KIND, record)
