"""Image services: import (files on the node at once, or a URL as an operation) and delete. List, show and the
description/labels patch are the generic ones of :data:`minicloud.compute.kinds.IMAGE`.

Every write goes through :mod:`minicloud.core.write` (audit + idempotency in the same transaction), also the image
record a URL import commits when its download has finished: it is written with the requester's :class:`Context`,
captured when the import started, so the audit entry names the requester and ``compute:images:create`` and the
project's guards apply as for any create. The files live in the node's image store (:mod:`image_files`); a failed
import or record keeps nothing.

Pools: a disk image is recorded in a storage pool (``--pool``, else the default pool) with ``status.pool_state =
importing``; the storage reconciler of the image's node copies the disk into the pool and says ``ready`` (an RBD
image with a protected ``base`` snapshot on Ceph, which instances on every node clone). Kernel images stay files on
their node. :func:`pool_for` and :func:`default_pool` are the lookups the instance services share.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from minicloud import errors, ids
from minicloud.compute import image_download, image_files
from minicloud.compute.kinds import IMAGE, INSTANCE, ImageFileSpec, ImageSpec, ImageStatus
from minicloud.compute.url_policy import UrlPolicy
from minicloud.core import crud
from minicloud.core.context import Context
from minicloud.core.kinds import Obj
from minicloud.core.operation import OPERATION
from minicloud.core.write import Written, replay
from minicloud.model.compute import ImageImport
from minicloud.state import Store, list_all
from minicloud.storage import common
from minicloud.storage.kinds import LOCAL_POOL_NAME, POOL, VOLUME, PoolSpec

if TYPE_CHECKING:
    from minicloud.config import Config
    from minicloud.operations import Operations, Reporter, Work
    from minicloud.state import Record

__all__ = ["NodeImages", "default_pool", "delete_image", "import_image", "pool_for"]

Pool = Obj[PoolSpec, Any]

#: The operation action of a URL import (what ``GET /v1/operations`` shows).
IMPORT_ACTION = "image.import"


@dataclass(frozen=True)
class NodeImages:
    """What the image services need of this node: its image store, where imports may read files, how URL imports
    may download, and the operations runner that runs them."""

    node: str
    #: ``<data_dir>/images``
    root: Path
    #: ``<data_dir>/import`` and ``compute.image_dirs``
    import_dirs: list[Path]
    url_allow: list[str]
    url_max_bytes: int
    operations: Operations | None = None
    #: Uploads (``PUT /v1/images/{name}/file``, :mod:`minicloud.compute.image_upload`): the largest, the slowest
    #: average rate and the longest silence they may have, and the free space they leave on the image store's disk.
    upload_max_bytes: int = 20 << 30
    upload_min_rate: int = 128 << 10
    upload_idle_timeout: float = 60.0
    reserved_bytes: int = 1 << 30

    @classmethod
    def from_config(cls, config: Config, operations: Operations | None = None) -> NodeImages:
        return cls(
            node=config.node_name,
            root=config.data_path / "images",
            import_dirs=[config.data_path / "import", *(Path(d) for d in config.compute.image_dirs)],
            url_allow=list(config.compute.image_url_allow),
            url_max_bytes=config.compute.image_url_max_bytes,
            operations=operations,
            upload_max_bytes=config.compute.image_upload_max_bytes,
            upload_min_rate=config.compute.image_upload_min_rate,
            upload_idle_timeout=config.compute.image_upload_idle_timeout,
            reserved_bytes=config.compute.reserved_disk_gib << 30,
        )


async def default_pool(store: Store) -> Pool | None:
    """The pool marked default, else the ``local`` pool, else None (storage was never set up: no pool records)."""
    pools = [POOL.load(r) for r in await list_all(store, POOL.name)]  # a handful: cluster-wide pools
    for pool in sorted(pools, key=lambda p: p.name):
        if pool.spec.default:
            return pool
    return next((p for p in pools if p.name == LOCAL_POOL_NAME), None)


async def pool_for(ctx: Context, store: Store, ref: str | None, *, param: str = "pool") -> Pool | None:
    """The pool ``ref`` names (404 when there is none), or the default one when ``ref`` is None."""
    if ref is None:
        return await default_pool(store)
    pool = await crud.find(ctx, store, POOL, ref)
    if pool is None:
        raise errors.NotFound(
            f"there is no storage pool '{ref[:64]}'; see `minicloud pool list`",
            invalid_params=[{"name": param, "reason": "unknown pool"}],
        )
    return pool


def _spec(
    node: NodeImages, body: ImageImport, result: image_files.ImportResult, pool: Pool | None, source: str | None = None
) -> ImageSpec:
    in_pool = pool is not None and result.boot == "disk"
    return ImageSpec(
        boot=result.boot,
        format=result.format,
        virtual_size_bytes=result.virtual_size_bytes,
        size_bytes=result.size_bytes,
        sha256=result.sha256,
        files={k: ImageFileSpec(size_bytes=f.size_bytes, sha256=f.sha256) for k, f in result.files.items()},
        cmdline=body.cmdline,
        firmware=body.firmware,
        os={k: v for k, v in {"distro": body.os_distro, "version": body.os_version}.items() if v},
        node=node.node,
        source=source if source is not None else body.url or body.path or body.kernel or "",
        description=body.description,
        pool=pool.id if in_pool and pool is not None else "",
        pool_driver=pool.spec.driver if in_pool and pool is not None else "",
    )


def _new(
    ctx: Context,
    node: NodeImages,
    body: ImageImport,
    image_id: str,
    result: image_files.ImportResult,
    pool: Pool | None,
    *,
    source: str | None = None,
) -> Obj:
    spec = _spec(node, body, result, pool, source)
    return IMAGE.new(
        project=ctx.project,
        name=body.name,
        labels=body.labels,
        id=image_id,
        spec=spec,
        # the image's node copies the disk into the pool and says ``ready`` (agent.reconcilers.storage)
        status=ImageStatus(pool_state="importing" if spec.pool else ""),
        stamp=ctx.clock(),
    )


async def import_image(ctx: Context, store: Store, node: NodeImages, body: ImageImport) -> Written:
    """Import an image into ``ctx``'s project. Files on the node are copied and checked at once (201 with the
    image); a URL is downloaded by an operation (202 with the operation, whose result names the image). qemu-img
    decides the format. All or nothing; idempotent under ``ctx.idempotency``; 409 when the name is taken."""
    image_files.check_sources(path=body.path, url=body.url, kernel=body.kernel, initrd=body.initrd, sha256=body.sha256)
    if (first := await replay(ctx, store)) is not None:
        return first
    if await store.get_by_name(IMAGE.name, ctx.project, body.name) is not None:
        raise errors.AlreadyExists(f"an image named '{body.name}' already exists in project '{ctx.project}'")
    if body.pool is not None and body.kernel is not None:
        raise errors.ValidationFailed(
            "kernel images stay files on their node: --pool is for disk images",
            invalid_params=[{"name": "pool", "reason": "not for kernel images"}],
        )
    pool = await pool_for(ctx, store, body.pool)  # checked before anything is copied or downloaded
    if body.url is not None:
        return await _start_url_import(ctx, store, node, body, pool)
    image_id = ids.new_id(IMAGE.prefix)
    result = await asyncio.to_thread(
        image_files.import_files,
        node.root,
        image_id,
        allowed_dirs=node.import_dirs,
        path=body.path,
        expected_format=body.format,
        expected_sha256=body.sha256,
        kernel=body.kernel,
        initrd=body.initrd,
    )
    try:
        return await crud.create(ctx, store, IMAGE, _new(ctx, node, body, image_id, result, pool))
    except BaseException:
        await asyncio.to_thread(image_files.remove, node.root, image_id)
        raise


async def _start_url_import(
    ctx: Context, store: Store, node: NodeImages, body: ImageImport, pool: Pool | None
) -> Written:
    """Commit the import's operation (202) and start it. A refused address in the URL itself is refused here, before
    anything is written."""
    assert body.url is not None and node.operations is not None
    policy = UrlPolicy.from_config(node.url_allow)
    image_download.check_url(body.url, policy)
    operations = node.operations
    image_id = ids.new_id(IMAGE.prefix)
    # The image is recorded on the requester's behalf: their context, less the Idempotency-Key (which answered the
    # request with this operation and must not answer the image's commit with it too).
    requester = dataclasses.replace(ctx, idempotency=None)

    def work(record: Record) -> Work:
        async def download(report: Reporter) -> dict[str, Any]:
            return await _download_and_record(requester, store, node, body, image_id, policy, pool, report)

        return download

    target = {"kind": IMAGE.name, "id": image_id, "name": body.name}
    return await operations.start(ctx, IMPORT_ACTION, target, work, label=OPERATION.label)


async def _download_and_record(
    ctx: Context,
    store: Store,
    node: NodeImages,
    body: ImageImport,
    image_id: str,
    policy: UrlPolicy,
    pool: Pool | None,
    report: Reporter,
) -> dict[str, Any]:
    """The URL import operation: download into a staging directory, check, move into place, record. A failure at any
    step removes what was written: nothing is kept and no image record exists."""
    assert body.url is not None
    root = node.root
    loop = asyncio.get_running_loop()
    # Download, hashing and qemu-img run on a thread of this import's own, so slow imports never hold the default
    # executor's threads that the rest of the API needs (password checks, file copies).
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-import")
    try:
        staging = await loop.run_in_executor(executor, image_files.new_staging, root, image_id)
        try:
            got = await image_download.download(
                body.url,
                staging / "disk",
                policy=policy,
                max_bytes=node.url_max_bytes,
                executor=executor,
                report=report,
                expected_sha256=body.sha256,
            )
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        await report(got.size_bytes, got.size_bytes, "checking the image")
        fmt, vsize = await loop.run_in_executor(executor, image_files.finish_disk, root, image_id, staging, body.format)
        await report(got.size_bytes, got.size_bytes, "recording the image")
    finally:
        executor.shutdown(wait=False)
    disk = image_files.StoredFile(got.size_bytes, got.sha256)
    result = image_files.ImportResult(boot="disk", format=fmt, virtual_size_bytes=vsize, files={"disk": disk})
    try:
        await crud.create(ctx, store, IMAGE, _new(ctx, node, body, image_id, result, pool))
    except BaseException as exc:
        await asyncio.to_thread(image_files.remove, root, image_id)
        if isinstance(exc, errors.AlreadyExists):
            raise errors.AlreadyExists(
                f"an image named '{body.name}' was created in project '{ctx.project}' while this one downloaded; "
                "import it under another name"
            ) from None
        raise
    return {"image_id": image_id, "name": body.name, "size_bytes": got.size_bytes, "sha256": got.sha256}


async def delete_image(ctx: Context, store: Store, node: NodeImages, ref: str, *, expect: int | None = None) -> Written:
    """Delete the image ``ref`` names (204); 409 while instances use it (looked up by the instances' ``image_id``
    index) or volumes were made from its pool copy, in any project (the volumes' ``image_id`` index; another
    project's are named by id). Race-free against instance and volume creates: the image is marked ``deleting``
    (CAS) before the last look for users, so a create that commits after the mark fails its Check on the image and
    is refused, and one before it is seen; the mark goes with a refusal, and one a crash left is taken over by the next delete. Its
    files are removed here when this node holds them; otherwise the image's node removes them (its compute
    reconciler collects files no record names)."""

    async def step(_: int) -> Written:
        obj = await crud.get(ctx, store, IMAGE, ref)
        if expect is not None and expect != obj.revision:
            raise errors.PreconditionFailed(
                "the image was changed since the revision you sent in If-Match; read it again and retry"
            )
        # Instances use it (their creates Check it: marked first, then looked at again), and volumes made from it
        # are clones of its pool copy (RBD children of its ``base`` snapshot): the copy cannot go while they exist.
        return await common.delete_marked(
            ctx,
            store,
            IMAGE,
            obj,
            lambda o: _refuse_users(ctx, store, o),
            lambda o: crud.delete_obj(ctx, store, IMAGE, o, expect=o.revision),
        )

    obj = await crud.get(ctx, store, IMAGE, ref)
    written = await (step(0) if expect is not None else common.retrying(step))
    if obj.spec.node == node.node:
        await asyncio.to_thread(image_files.remove, node.root, obj.id)
    return written


async def _refuse_users(ctx: Context, store: Store, image: Obj) -> None:
    """409 while instances use ``image`` (the instances' ``image_id`` index, every project) or volumes were made
    from its pool copy."""
    users = [r.name for r in await list_all(store, INSTANCE.name, where={"image_id": image.id})]
    if users:
        shown = ", ".join(sorted(users)[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
        raise errors.InUse(
            f"image '{image.name}' is used by {len(users)} instance(s) ({shown}); delete them first",
            instances=len(users),
        )
    if image.spec.pool:
        await _refuse_clones(ctx, store, image)


async def _refuse_clones(ctx: Context, store: Store, image: Obj) -> None:
    """409 naming the volumes made from ``image`` that are not being deleted, in every project: the caller's by
    name, others' by id."""
    found = {r.id: r for r in await list_all(store, VOLUME.name, where={"image_id": image.id})}
    # volumes recorded before ``image_id`` existed: the image's project, by their source
    found.update({r.id: r for r in await list_all(store, VOLUME.name, project=image.project)})
    clones = [
        v
        for r in found.values()
        if (v := VOLUME.load(r)).spec.source.type == "image" and v.spec.source.id == image.id and not v.spec.deleted
    ]
    if clones:
        shown = sorted(v.name if v.project == ctx.project else v.id for v in clones)
        listed = ", ".join(shown[:5]) + (f" and {len(shown) - 5} more" if len(shown) > 5 else "")
        raise errors.InUse(
            f"image '{image.name}' has {len(clones)} volume(s) made from it ({listed}); delete them first",
            volumes=len(clones),
        )
