"""``/v1/images``: import (from files on the node, or a URL as an operation), upload (``PUT /v1/images/{name}/file``,
:mod:`minicloud.compute.image_upload`) and delete (refused while instances use the image) call
:mod:`minicloud.compute.images`; list, show and update come from the kind's declaration."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import re

import msgspec
from aiohttp import web

from minicloud import errors
from minicloud.api import generic
from minicloud.api import resources as res
from minicloud.api.auth import principal_of
from minicloud.api.keys import CONFIG, OPERATIONS, STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.compute import image_upload, images
from minicloud.compute.kinds import IMAGE
from minicloud.core.context import Context, Idempotency
from minicloud.model import NAME_PATTERN, Labels
from minicloud.model.compute import Image, ImageImport, ImageUploadQuery

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

#: ``X-Checksum-Sha256: <64 hex digits>``, or RFC 9530's ``Content-Digest: sha-256=:<base64>:``.
CHECKSUM_HEADER = "X-Checksum-Sha256"
_CONTENT_DIGEST = re.compile(r"(?:^|,)\s*sha-256=:([A-Za-z0-9+/=]{44}):\s*(?:,|$)")


def _upload_sha256(request: web.Request) -> str:
    """The SHA-256 the client announces (hex, lowercase): from ``X-Checksum-Sha256`` or ``Content-Digest``."""
    given = []
    if (hexdigest := request.headers.get(CHECKSUM_HEADER)) is not None:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", hexdigest.strip()):
            raise errors.BadRequest(f"{CHECKSUM_HEADER} must be the body's SHA-256 as 64 hex digits")
        given.append(hexdigest.strip().lower())
    if (digest := request.headers.get("Content-Digest")) is not None and (m := _CONTENT_DIGEST.search(digest)):
        try:
            given.append(base64.b64decode(m[1], validate=True).hex())
        except (binascii.Error, ValueError):
            raise errors.BadRequest("Content-Digest's sha-256 is not valid base64") from None
    if not given:
        raise errors.BadRequest(
            f"an upload needs the body's SHA-256: send '{CHECKSUM_HEADER}: <64 hex digits>' (or "
            "'Content-Digest: sha-256=:<base64>:'); `minicloud image import` and client.images.upload() do"
        )
    if len(set(given)) > 1:
        raise errors.BadRequest(f"{CHECKSUM_HEADER} and Content-Digest name different SHA-256s")
    return given[0]


def _upload_labels(text: str) -> dict[str, str]:
    labels = res.parse_selector(text) if text else {}
    try:
        return msgspec.convert(labels, Labels)
    except msgspec.ValidationError as exc:
        raise errors.ValidationFailed(
            f"invalid labels: {exc}", invalid_params=[{"name": "labels", "reason": str(exc)}]
        ) from None


async def _upload_context(request: web.Request, sha256: str, size: int) -> Context:
    """The request's context, with its ``Idempotency-Key`` (if any) fingerprinted by what identifies the upload —
    method, path, query, size and SHA-256 — instead of the body, which is not read twice (nor buffered)."""
    ctx = await res.context_of(request)
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return ctx
    if not (1 <= len(key) <= 255 and key.isprintable()):
        raise errors.BadRequest("Idempotency-Key must be 1-255 printable characters, e.g. a UUID")
    # Scoped like every other keyed request (resources._idempotency): caller, project, key.
    scope = f"{principal_of(request).ref}\0{ctx.project}\0{key}"
    record_id = "idem-" + hashlib.sha256(scope.encode()).hexdigest()[:40]
    query = msgspec.json.encode(sorted(request.query.items()))
    line = f"{request.method} {request.path}\0".encode() + query + f"\0{size}\0{sha256}".encode()
    from minicloud.api.accesskeys import KEYSTORE  # the app's key store (a module-level import would be a cycle)

    idem = Idempotency(
        record_id, hashlib.sha256(line).hexdigest(), request.app[KEYSTORE], request.app[CONFIG].api.idempotency_ttl
    )
    return dataclasses.replace(ctx, idempotency=idem)


@routes.route(
    "PUT",
    "/v1/images/{name}/file",
    query=ImageUploadQuery,
    response=Image,
    status=201,
    auth=Action("compute:images:create"),
)
async def upload_image(request: web.Request, query: ImageUploadQuery) -> Reply:
    """Upload a disk image (qcow2 or raw) as the request body: Content-Length and X-Checksum-Sha256 required.

    The body (``application/octet-stream``) is streamed to the node's image store, checked like a node-path import
    and recorded as image ``name`` (201). A wrong checksum or a disk qemu-img refuses is 422, a body cut short 400,
    a stalled one 408, an oversize Content-Length 413 before anything is read: each keeps nothing."""
    name = request.match_info["name"]
    if not re.fullmatch(NAME_PATTERN, name):
        raise errors.ValidationFailed(
            f"'{name[:64]}' is not a valid image name: 1-63 letters, digits, '-', '_' or '.', starting with a letter "
            "or digit",
            invalid_params=[{"name": "name", "reason": "invalid name"}],
        )
    if request.headers.get("Transfer-Encoding", "").lower().strip() == "chunked" or request.content_length is None:
        raise LengthRequired("an upload needs a Content-Length (the image's size in bytes); chunked bodies are refused")
    if request.content_type != "application/octet-stream":
        raise errors.UnsupportedMediaType(
            f"send the disk image as 'Content-Type: application/octet-stream' (got '{request.content_type}')"
        )
    size = request.content_length
    if size == 0:
        raise errors.BadRequest("the body is empty: send the disk image's bytes")
    sha256 = _upload_sha256(request)
    meta = ImageImport(
        name=name,
        format=query.format,
        sha256=sha256,
        firmware=query.firmware,
        os_distro=query.os_distro,
        os_version=query.os_version,
        pool=query.pool,
        description=query.description,
        labels=_upload_labels(query.labels),
    )
    ctx = await _upload_context(request, sha256, size)
    released = False

    async def read() -> bytes:
        nonlocal released
        if not released:
            # The caller is authorised and the upload checked: the service bounds the body from here on (an idle
            # timeout and a minimum rate) instead of the API's body_timeout (agent.http_server).
            released = True
            release = getattr(request.protocol, "release_body_deadline", None)
            if release is not None:
                release()
        return await request.content.readany()

    written = await image_upload.upload_image(
        ctx, request.app[STORE], _node(request.app), meta, size=size, sha256=sha256, read=read
    )
    return res.reply(request, written)


class LengthRequired(errors.MinicloudError):
    status = 411
    slug = "length-required"
    title = "The request needs a Content-Length"


@routes.delete("/v1/images/{ref}", status=204, auth=Action("compute:images:delete"))
async def delete_image(request: web.Request) -> Reply:
    """Delete an image; refused while instances use it."""
    ctx = await res.context_of(request)
    written = await images.delete_image(
        ctx, request.app[STORE], _node(request.app), request.match_info["ref"], expect=res.if_match(request)
    )
    return res.reply(request, written)
