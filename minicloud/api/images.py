"""``/v1/images``: import (from files on the node or a URL), list, show, update and delete images."""

from __future__ import annotations

import asyncio
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from minicloud import errors, ids
from minicloud.api import resources as res
from minicloud.api.keys import CONFIG, OPERATIONS, STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.compute import image_download
from minicloud.compute import images as store_files
from minicloud.compute.url_policy import UrlPolicy
from minicloud.core.operation import OPERATION
from minicloud.model import Page
from minicloud.model.compute import Image, ImageFile, ImageImport, ImageUpdate
from minicloud.operations import Reporter
from minicloud.state import Create, Record, Txn, TxnFailed, list_all

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


# A route declares one response type: the 201 Image. With ``url`` the answer is 202 with an Operation instead.
@routes.post("/v1/images", body=ImageImport, response=Image, status=201, auth=Action("compute:images:create"))
async def import_image(request: web.Request, body: ImageImport) -> Reply:
    """Import an image: files on the node are copied and checked at once (201 with the image); a URL is downloaded
    by an operation (202 with the operation; its result names the image). qemu-img decides the format. All or nothing.
    """
    app = request.app
    store = app[STORE]
    project = res.scope_of(request, KIND)
    store_files.check_sources(path=body.path, url=body.url, kernel=body.kernel, initrd=body.initrd, sha256=body.sha256)
    if (replay := await res.replayed(request)) is not None:
        return replay
    if await store.get_by_name(KIND.name, project, body.name) is not None:
        raise errors.AlreadyExists(f"an image named '{body.name}' already exists in project '{project}'")
    if body.url is not None:
        return await _import_from_url(request, body, project)
    image_id = ids.new_id(KIND.prefix)
    result = await asyncio.to_thread(
        store_files.import_files,
        image_store(app),
        image_id,
        allowed_dirs=import_dirs(app),
        path=body.path,
        expected_format=body.format,
        expected_sha256=body.sha256,
        kernel=body.kernel,
        initrd=body.initrd,
    )
    record = msgspec.structs.replace(
        res.new_record(KIND, request, body.name, body.labels, _spec(app, body, result)), id=image_id
    )
    try:
        return await res.create(request, KIND, record)
    except BaseException:
        await asyncio.to_thread(store_files.remove, image_store(app), image_id)
        raise


def _spec(app: web.Application, body: ImageImport, result: store_files.ImportResult) -> dict[str, Any]:
    return {
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
    }


async def _import_from_url(request: web.Request, body: ImageImport, project: str) -> Reply:
    """Answer 202 with an operation that downloads, checks and records the image (see ``compute/image_download``).
    A refused address in the URL itself is refused here, before anything is written."""
    app = request.app
    config = app[CONFIG].compute
    policy = UrlPolicy.from_config(config.image_url_allow)
    assert body.url is not None
    image_download.check_url(body.url, policy)
    operations = app[OPERATIONS]
    image_id = ids.new_id(KIND.prefix)
    record = operations.new_record("image.import", {"kind": KIND.name, "id": image_id, "name": body.name}, project)

    async def work(report: Reporter) -> dict[str, Any]:
        return await _download_and_record(app, body, project, image_id, policy, report)

    reply = await res.write(
        request,
        [Create(record)],
        status=202,
        kind_name="operation",
        respond=lambda rev: OPERATION.view_record(msgspec.structs.replace(record, revision=rev)),
        headers=lambda rev: {"Location": f"/v1/operations/{record.id}"},
    )
    if not reply.headers.get("Idempotent-Replayed"):
        operations.run(record, work)
    return reply


async def _download_and_record(
    app: web.Application, body: ImageImport, project: str, image_id: str, policy: UrlPolicy, report: Reporter
) -> dict[str, Any]:
    """The URL import operation: download into a staging directory, check, move into place, record. A failure at any
    step removes what was written: nothing is kept and no image record exists."""
    assert body.url is not None
    root = image_store(app)
    loop = asyncio.get_running_loop()
    # Download, hashing and qemu-img run on a thread of this import's own, so slow imports never hold the default
    # executor's threads that the rest of the API needs (password checks, file copies).
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-import")
    try:
        staging = await loop.run_in_executor(executor, store_files.new_staging, root, image_id)
        try:
            got = await image_download.download(
                body.url,
                staging / "disk",
                policy=policy,
                max_bytes=app[CONFIG].compute.image_url_max_bytes,
                executor=executor,
                report=report,
                expected_sha256=body.sha256,
            )
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        await report(got.size_bytes, got.size_bytes, "checking the image")
        fmt, vsize = await loop.run_in_executor(executor, store_files.finish_disk, root, image_id, staging, body.format)
        await report(got.size_bytes, got.size_bytes, "recording the image")
    finally:
        executor.shutdown(wait=False)
    disk = store_files.StoredFile(got.size_bytes, got.sha256)
    result = store_files.ImportResult(boot="disk", format=fmt, virtual_size_bytes=vsize, files={"disk": disk})
    stamp = ids.now()
    image = Record(
        kind=KIND.name, id=image_id, project=project, name=body.name, labels=body.labels,
        spec=_spec(app, body, result), created_at=stamp, updated_at=stamp,
    )  # fmt: skip
    try:
        await app[STORE].commit(Txn([Create(image)]))
    except BaseException as exc:
        store_files.remove(root, image_id)
        if isinstance(exc, TxnFailed) and exc.reason == "name-taken":
            raise errors.AlreadyExists(
                f"an image named '{body.name}' was created in project '{project}' while this one downloaded; "
                "import it under another name"
            ) from None
        if isinstance(exc, TxnFailed):
            raise errors.Conflict(f"the image could not be recorded ({exc.reason}); retry the import") from None
        raise
    return {"image_id": image_id, "name": body.name, "size_bytes": got.size_bytes, "sha256": got.sha256}


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
