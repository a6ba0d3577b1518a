"""``/v1/projects``: the tenancy boundary. Every resource lives in one project (``default`` unless
``?project=NAME`` says otherwise); names repeat freely across projects. List, show and the description/labels
patch come from the kind's declaration; create and the race-free delete are :mod:`minicloud.iam.projects`."""

from __future__ import annotations

from aiohttp import web

from minicloud.api import generic
from minicloud.api import resources as res
from minicloud.api.keys import STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.iam import projects
from minicloud.iam.kinds import PROJECT
from minicloud.model import Project, ProjectCreate

routes = Routes("projects")


@routes.post("/v1/projects", body=ProjectCreate, response=Project, status=201, auth=Action("iam:projects:create"))
async def create_project(request: web.Request, body: ProjectCreate) -> Reply:
    """Create a project."""
    return res.reply(request, await projects.create_project(await res.context_of(request), request.app[STORE], body))


generic.add_crud_routes(routes, PROJECT)


@routes.delete("/v1/projects/{ref}", status=204, auth=Action("iam:projects:delete"))
async def delete_project(request: web.Request) -> Reply:
    """Delete an empty project and, in the same transaction, its role bindings. `default` cannot be deleted.

    Race-free (`minicloud/iam/tenancy.py`): the project is first marked `deleting` (creates in it are refused from
    then on, and those already in flight fail their Check on its revision), then checked empty, then deleted with its
    bindings in one transaction conditional on that marked revision; if it is not empty it is marked active again."""
    ctx = await res.context_of(request)
    written = await projects.delete_project(
        ctx, request.app[STORE], request.match_info["ref"], expect=res.if_match(request)
    )
    return res.reply(request, written)
