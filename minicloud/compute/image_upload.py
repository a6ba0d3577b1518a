"""Image upload: a disk image streamed in the body of ``PUT /v1/images/{name}/file`` (``minicloud image import NAME
./disk.qcow2`` over a remote, ``client.images.upload``).

The contract of :func:`upload_image`:

- **One request, all or nothing.** The name, the metadata (query string), the size (``Content-Length``) and the
  SHA-256 (``X-Checksum-Sha256``) are known before the first byte is read, and everything that can be checked without
  the bytes is checked first: a replayed ``Idempotency-Key`` answers with the first reply at once; a taken name is
  409, an unknown pool 404, a size over ``compute.image_upload_max_bytes`` 413, one the image store's disk cannot
  hold (beyond ``compute.reserved_disk_gib``) 409 — none of them reads the body. Then the body is written to
  ``<data_dir>/images/.staging-<id>/disk`` while it arrives (hashed on the way, never held in memory), checked like a
  node-path import (SHA-256 as announced, else 422; qemu-img: qcow2 or raw only, the expected ``format``, no backing
  file, no external data file, ``qemu-img check``), moved into place and recorded. Any failure, a client that goes
  away included, removes the staging directory: no file and no record is left.
- **Time.** The API's ``body_timeout`` does not apply (the handler releases it once the caller is authorised); the
  body may take ``image_upload_idle_timeout`` + size / ``image_upload_min_rate`` seconds in all and may not be
  silent for ``image_upload_idle_timeout`` seconds (408, nothing kept). A stalled client therefore holds its
  connection and a staging file for a bounded time.
- **Record.** As a node-path import: the node is this one, ``source`` is ``upload``, the pool fields are set as
  :func:`minicloud.compute.images.import_image` sets them (the storage reconciler copies the disk into a ceph pool,
  as raw, and says ``ready``).

File writes, hashing and qemu-img run on a thread of the upload's own, never on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from minicloud import errors, ids
from minicloud.compute import image_files
from minicloud.compute.image_download import _close, _write  # the node-path download writes the same way
from minicloud.compute.images import NodeImages, _new, pool_for
from minicloud.compute.kinds import IMAGE
from minicloud.core import crud
from minicloud.core.context import Context
from minicloud.core.write import Written, replay
from minicloud.model.compute import ImageImport
from minicloud.state import Store

__all__ = ["Read", "RequestTimeout", "upload_image"]

#: Reads the next bytes of the body; ``b""`` at its end. Raises when the client went away.
Read = Callable[[], Awaitable[bytes]]
#: Bytes gathered before one write on the upload's thread.
WRITE_CHUNK = 1 << 20
#: What ``ImageSpec.source`` says for an uploaded image.
SOURCE = "upload"


class RequestTimeout(errors.MinicloudError):
    status = 408
    slug = "request-timeout"
    title = "The request body did not arrive in time"


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def _cut_off(what: str) -> errors.BadRequest:
    return errors.BadRequest(f"{what}; nothing was kept, upload the image again")


def check_size(node: NodeImages, size: int) -> None:
    """413 over the configured bound; 409 when the image store's disk cannot take it and keep its reserve."""
    if size > node.upload_max_bytes:
        raise errors.PayloadTooLarge(
            f"the image is {size} bytes, larger than {node.upload_max_bytes} bytes, the most an upload may be "
            "(compute.image_upload_max_bytes)"
        )
    node.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    free = shutil.disk_usage(node.root).free
    if size > free - node.reserved_bytes:
        raise errors.InsufficientCapacity(
            f"node '{node.node}' has {_gib(max(free, 0))} free for images and keeps {_gib(node.reserved_bytes)} "
            f"(compute.reserved_disk_gib); a {_gib(size)} upload does not fit",
            free_bytes=free,
        )


async def upload_image(
    ctx: Context,
    store: Store,
    node: NodeImages,
    meta: ImageImport,
    *,
    size: int,
    sha256: str,
    read: Read,
) -> Written:
    """Receive a disk image of ``size`` bytes whose SHA-256 is ``sha256`` from ``read`` and record it as ``meta``
    says (see the module docstring). 201 with the image; idempotent under ``ctx.idempotency``."""
    if (first := await replay(ctx, store)) is not None:
        return first
    if await store.get_by_name(IMAGE.name, ctx.project, meta.name) is not None:
        raise errors.AlreadyExists(f"an image named '{meta.name}' already exists in project '{ctx.project}'")
    pool = await pool_for(ctx, store, meta.pool)
    check_size(node, size)
    image_id = ids.new_id(IMAGE.prefix)
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-upload")
    try:
        staging = await loop.run_in_executor(executor, image_files.new_staging, node.root, image_id)
        try:
            got = await _receive(read, staging / "disk", size, node, loop, executor)
            image_files.check_sha256(got.sha256, sha256)
        except BaseException:
            await asyncio.shield(loop.run_in_executor(executor, shutil.rmtree, staging, True))
            raise
        fmt, vsize = await loop.run_in_executor(
            executor, image_files.finish_disk, node.root, image_id, staging, meta.format
        )
    finally:
        executor.shutdown(wait=False)
    result = image_files.ImportResult(boot="disk", format=fmt, virtual_size_bytes=vsize, files={"disk": got})
    try:
        return await crud.create(ctx, store, IMAGE, _new(ctx, node, meta, image_id, result, pool, source=SOURCE))
    except BaseException as exc:
        await asyncio.to_thread(image_files.remove, node.root, image_id)
        if isinstance(exc, errors.AlreadyExists):
            raise errors.AlreadyExists(
                f"an image named '{meta.name}' was created in project '{ctx.project}' while this one was uploaded; "
                "upload it under another name"
            ) from None
        raise


def _open(path: Path) -> Any:
    return path.open("xb")


async def _receive(
    read: Read,
    dst: Path,
    size: int,
    node: NodeImages,
    loop: asyncio.AbstractEventLoop,
    executor: ThreadPoolExecutor,
) -> image_files.StoredFile:
    """Write exactly ``size`` bytes from ``read`` to ``dst``, hashing them, within the upload's time bounds."""
    start = time.monotonic()
    deadline = start + node.upload_idle_timeout + size / node.upload_min_rate
    digest = hashlib.sha256()
    received = 0
    pending = bytearray()
    fout = await loop.run_in_executor(executor, _open, dst)
    complete = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestTimeout(
                    f"the upload sent {received} of {size} bytes in {time.monotonic() - start:.0f} s, slower than "
                    f"{node.upload_min_rate} bytes/s (compute.image_upload_min_rate); nothing was kept"
                )
            try:
                chunk = await asyncio.wait_for(read(), min(node.upload_idle_timeout, left))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    continue  # the overall bound: said above
                raise RequestTimeout(
                    f"the upload sent nothing for {node.upload_idle_timeout:g} s after {received} of {size} bytes "
                    "(compute.image_upload_idle_timeout); nothing was kept"
                ) from None
            except errors.MinicloudError:
                raise
            except Exception:
                # aiohttp's payload errors when the client disconnects (ContentLengthError, ClientConnectionError…)
                raise _cut_off(f"the connection closed after {received} of {size} bytes") from None
            if not chunk:
                break
            received += len(chunk)
            if received > size:  # aiohttp stops at Content-Length; another reader might not
                raise _cut_off(f"the body is longer than its Content-Length ({size} bytes)")
            pending += chunk
            if len(pending) >= WRITE_CHUNK:
                data, pending = bytes(pending), bytearray()
                await loop.run_in_executor(executor, _write, fout, digest, data)
        if received != size:
            raise _cut_off(f"the body ended after {received} of its {size} bytes (Content-Length)")
        if pending:
            await loop.run_in_executor(executor, _write, fout, digest, bytes(pending))
        complete = True
    finally:
        await asyncio.shield(loop.run_in_executor(executor, _close, fout, complete))
    return image_files.StoredFile(size, digest.hexdigest())
