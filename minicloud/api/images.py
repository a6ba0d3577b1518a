"""``/v1/images``: import (from files on the node, or a URL as an operation) and delete (refused while instances use
the image) call :mod:`minicloud.compute.images`; list, show and update come from the kind's declaration."""

from __future__ import annotations

from aiohttp import web

from minicloud.api import generic
from minicloud.api import resources as res
from minicloud.api.keys import CONFIG, OPERATIONS, STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.compute import images
from minicloud.compute.kinds import IMAGE
from minicloud.model.compute import Image, ImageImport

routes = Routes("images")


def _node(app: web.Application) -> images.NodeImages:
    return images.NodeImages.from_config(app[CONFIG], app.get(OPERATIONS))


# A route declares one response type: the 201 Image. With ``url`` the answer is 202 with an Operation instead.
@routes.post("/v1/images", body=ImageImport, response=Image, status=201, auth=Action("compute:images:create"))
async def import_image(request: web.Request, body: ImageImport) -> Reply:
    """Import an image: files on the node are copied and checked at once (201 with the image); a URL is downloaded
    by an operation (202 with the operation; its result names the image). qemu-img decides the format. All or nothing.
    """
    ctx = await res.context_of(request)
    written = await images.import_image(ctx, request.app[STORE], _node(request.app), body)
    return res.reply(request, written)


generic.add_crud_routes(routes, IMAGE)


@routes.delete("/v1/images/{ref}", status=204, auth=Action("compute:images:delete"))
async def delete_image(request: web.Request) -> Reply:
    """Delete an image; refused while instances use it."""
    ctx = await res.context_of(request)
    written = await images.delete_image(
        ctx, request.app[STORE], _node(request.app), request.match_info["ref"], expect=res.if_match(request)
    )
    return res.reply(request, written)
