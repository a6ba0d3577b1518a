"""``/v1/keypairs``: import SSH public keys; list, show, update and delete come from the kind's declaration."""

from __future__ import annotations

from aiohttp import web

from minicloud.api import generic
from minicloud.api import resources as res
from minicloud.api.keys import STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.compute.keypairs import import_keypair
from minicloud.compute.kinds import KEYPAIR
from minicloud.model import KeyPair, KeyPairCreate

routes = Routes("keypairs")


@routes.post("/v1/keypairs", body=KeyPairCreate, response=KeyPair, status=201, auth=Action("compute:keypairs:create"))
async def create_keypair(request: web.Request, body: KeyPairCreate) -> Reply:
    """Import an OpenSSH public key."""
    written = await import_keypair(await res.context_of(request), request.app[STORE], body)
    return res.reply(request, written)


generic.add_crud_routes(routes, KEYPAIR)
