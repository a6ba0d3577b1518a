"""``/v1/images``: import (from files on the node or a URL), list, show, update and delete images."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
from aiohttp import web

from minicloud import errors, ids
from minicloud.api import resources as res
from minicloud.api.keys import CONFIG, STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.compute import images as store_files
from minicloud.model import Page
from minicloud.model.compute import Image, ImageFile, ImageImport, ImageUpdate
from minicloud.state import Record, list_all

routes = Routes("images")
INSTANCE_KIND = "instance"


def view(r: Record) -> Image:
    s = r.spec
    return Image(
        **r.common_fields(),
        boot=s["boot"],
        format=s.get("format"),
        virtual_size_bytes=s.get("virtual_size_bytes"),
        size_bytes=s["size_bytes"],
        sha256=s["sha256"],
        files={k: ImageFile(**v) for k, v in s.get("files", {}).items()},
        cmdline=s.get("cmdline", ""),
        firmware=s.get("firmware", "bios"),
        os=s.get("os", {}),
        node=s["node"],
        source=s.get("source", ""),
        description=s.get("description", ""),
    )


KIND = res.register_kind(res.Kind("image", "images", "img", view, "image"))


def image_store(app: web.Application) -> Path:
    return app[CONFIG].data_path / "images"


def import_dirs(app: web.Application) -> list[Path]:
    config = app[CONFIG]
    return [config.data_path / "import", *(Path(d) for d in config.compute.image_dirs)]


@routes.get("/v1/images", query=res.ListQuery, response=Page[Image], auth=Action("compute:images:list"))
async def list_images(request: web.Request, query: res.ListQuery) -> Page[Image]:
    """List images."""
    return await res.list_page(request, KIND, query)


@routes.post("/v1/images", body=ImageImport, response=Image, status=201, auth=Action("compute:images:create"))
async def import_image(request: web.Request, body: ImageImport) -> Reply:
    """Import an image: copy and check the files (qemu-img decides the format), then record it. All or nothing."""
    app = request.app
    store = app[STORE]
    project = res.scope_of(request, KIND)
    if (replay := await res.replayed(request)) is not None:
        return replay
    if await store.get_by_name(KIND.name, project, body.name) is not None:
        raise errors.AlreadyExists(f"an image named '{body.name}' already exists in project '{project}'")
    image_id = ids.new_id(KIND.prefix)
    result = await asyncio.to_thread(
        store_files.import_files,
        image_store(app),
        image_id,
        allowed_dirs=import_dirs(app),
        path=body.path,
        url=body.url,
        expected_format=body.format,
        kernel=body.kernel,
        initrd=body.initrd,
    )
    record = res.new_record(
        KIND,
        request,
        body.name,
        body.labels,
        {
            "boot": result.boot,
            "format": result.format,
            "virtual_size_bytes": result.virtual_size_bytes,
            "size_bytes": result.size_bytes,
            "sha256": result.sha256,
            "files": {k: {"size_bytes": f.size_bytes, "sha256": f.sha256} for k, f in result.files.items()},
            "cmdline": body.cmdline,
            "firmware": body.firmware,
            "os": {k: v for k, v in {"distro": body.os_distro, "version": body.os_version}.items() if v},
            "node": app[CONFIG].node_name,
            "source": body.url or body.path or body.kernel or "",
            "description": body.description,
        },
    )
    record = msgspec.structs.replace(record, id=image_id)
    try:
        return await res.create(request, KIND, record)
    except BaseException:
        await asyncio.to_thread(store_files.remove, image_store(app), image_id)
        raise


@routes.get("/v1/images/{ref}", response=Image, auth=Action("compute:images:get"))
async def show_image(request: web.Request) -> Reply:
    """Show an image by id or name."""
    return await res.show(request, KIND)


@routes.patch("/v1/images/{ref}", body=ImageUpdate, response=Image, auth=Action("compute:images:update"))
async def update_image(request: web.Request, body: ImageUpdate) -> Reply:
    """Change an image's description or labels (JSON merge patch; honours If-Match)."""
    return await res.update_description_labels(request, KIND, body)


@routes.delete("/v1/images/{ref}", status=204, auth=Action("compute:images:delete"))
async def delete_image(request: web.Request) -> Reply:
    """Delete an image; refused while instances use it."""
    record = await res.resolve(request, KIND)
    users = [r.name for r in await list_all(request.app[STORE], INSTANCE_KIND, where={"image_id": record.id})]
    if users:
        shown = ", ".join(sorted(users)[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
        raise errors.InUse(
            f"image '{record.name}' is used by {len(users)} instance(s) ({shown}); delete them first",
            instances=len(users),
        )
    reply = await res.delete(request, KIND, record)
    if record.spec.get("node") == request.app[CONFIG].node_name:
        await asyncio.to_thread(store_files.remove, image_store(request.app), record.id)
    # Otherwise the image's node removes the files: its compute reconciler collects files no record names.
    return reply
