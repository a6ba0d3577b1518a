"""``/v1/keypairs``: import, list, show, update and delete SSH public keys."""

from __future__ import annotations

from aiohttp import web

from minicloud.api import resources as res
from minicloud.api.routing import Action, Reply, Routes
from minicloud.compute.keypairs import parse_public_key
from minicloud.model import KeyPair, KeyPairCreate, KeyPairUpdate, Page
from minicloud.state import Record

routes = Routes("keypairs")


def view(r: Record) -> KeyPair:
    s = r.spec
    return KeyPair(
        **r.common_fields(),
        type=s["type"],
        fingerprint=s["fingerprint"],
        public_key=s["public_key"],
        comment=s.get("comment", ""),
        description=s.get("description", ""),
    )


KIND = res.register_kind(res.Kind("keypair", "keypairs", "kp", view, "keypair"))


@routes.get("/v1/keypairs", query=res.ListQuery, response=Page[KeyPair], auth=Action("compute:keypairs:list"))
async def list_keypairs(request: web.Request, query: res.ListQuery) -> Page[KeyPair]:
    """List key pairs."""
    return await res.list_page(request, KIND, query)


@routes.post("/v1/keypairs", body=KeyPairCreate, response=KeyPair, status=201, auth=Action("compute:keypairs:create"))
async def import_keypair(request: web.Request, body: KeyPairCreate) -> Reply:
    """Import an OpenSSH public key."""
    key = parse_public_key(body.public_key)
    record = res.new_record(
        KIND,
        request,
        body.name,
        body.labels,
        {
            "type": key.type,
            "fingerprint": key.fingerprint,
            "public_key": key.public_key,
            "comment": key.comment,
            "description": body.description,
        },
    )
    return await res.create(request, KIND, record)


@routes.get("/v1/keypairs/{ref}", response=KeyPair, auth=Action("compute:keypairs:get"))
async def show_keypair(request: web.Request) -> Reply:
    """Show a key pair by id or name."""
    return await res.show(request, KIND)


@routes.patch("/v1/keypairs/{ref}", body=KeyPairUpdate, response=KeyPair, auth=Action("compute:keypairs:update"))
async def update_keypair(request: web.Request, body: KeyPairUpdate) -> Reply:
    """Change a key pair's description or labels (JSON merge patch; honours If-Match)."""
    return await res.update_description_labels(request, KIND, body)


@routes.delete("/v1/keypairs/{ref}", status=204, auth=Action("compute:keypairs:delete"))
async def delete_keypair(request: web.Request) -> Reply:
    """Delete a key pair (honours If-Match)."""
    return await res.delete(request, KIND)
