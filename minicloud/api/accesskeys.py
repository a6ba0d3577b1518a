"""``/v1/accesskeys``: S3-style access key pairs for the object store.

The access key id is public (20 upper-case characters, like AWS's); the secret is shown once and then kept only
encrypted at rest with the node's key store (AES-256-GCM, the key id as associated data), because the object store
must recompute request signatures with it — unlike API keys, it cannot be a one-way hash.
"""

from __future__ import annotations

import base64
import os
import secrets

import msgspec
from aiohttp import web

from minicloud import errors, ids
from minicloud.api import resources as res
from minicloud.api.auth import authorize, principal_of
from minicloud.api.keys import STORE
from minicloud.api.routing import Action, Reply, Routes
from minicloud.iam.directory import USER_KIND
from minicloud.iam.keystore import KeyStore
from minicloud.model import AccessKey, AccessKeyCreate, AccessKeySecret, Page
from minicloud.state import Record

routes = Routes("accesskeys")
KEYSTORE = web.AppKey("keystore", KeyStore)
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


def view(r: Record) -> AccessKey:
    return AccessKey(**r.common_fields(), principal=r.spec["principal"], description=r.spec.get("description", ""))


KIND = res.register_kind(res.Kind("accesskey", "accesskeys", "MCAK", view, "accesskey"))


def new_access_key_id() -> str:
    return "MCAK" + "".join(secrets.choice(_ALPHABET) for _ in range(16))


@routes.get("/v1/accesskeys", query=res.ListQuery, response=Page[AccessKey], auth=Action("iam:accesskeys:list"))
async def list_access_keys(request: web.Request, query: res.ListQuery) -> Page[AccessKey]:
    """List access keys (never their secrets)."""
    return await res.list_page(request, KIND, query)


@routes.post(
    "/v1/accesskeys", body=AccessKeyCreate, response=AccessKeySecret, status=201, auth=Action("iam:accesskeys:create")
)
async def create_access_key(request: web.Request, body: AccessKeyCreate) -> Reply:
    """Create an access key pair; the secret is in this response only."""
    caller = principal_of(request)
    if body.user is not None:
        user = await request.app[STORE].get_by_name(USER_KIND, "", body.user)
        if user is None:
            raise errors.NotFound(f"no user named '{body.user}'; create it with `minicloud user create {body.user}`")
        owner = f"{user.spec.get('type', 'user')}:{user.name}"
        if owner != caller.ref:
            await authorize(request, caller, "iam:users:update", "", cluster=True)
    else:
        owner = caller.ref if caller.kind in ("user", "serviceaccount") else "user:admin"
    key_id = new_access_key_id()
    secret = base64.b64encode(os.urandom(30)).decode()  # 40 characters, like AWS secret access keys
    sealed = request.app[KEYSTORE].encrypt(secret.encode(), context=key_id.encode())
    stamp = ids.now()
    record = Record(
        kind=KIND.name, id=key_id, project=res.project_of(request), name=body.name,
        spec={"principal": owner, "description": body.description, "secret": sealed}, created_at=stamp, updated_at=stamp,
    )  # fmt: skip
    return await res.create(
        request,
        KIND,
        record,
        respond=lambda r: AccessKeySecret(**msgspec.structs.asdict(view(r)), secret_access_key=secret),
    )


@routes.get("/v1/accesskeys/{ref}", response=AccessKey, auth=Action("iam:accesskeys:get"))
async def show_access_key(request: web.Request) -> Reply:
    """Show an access key by id or name (never its secret)."""
    record = await res.resolve(request, KIND)
    return Reply(view(record), headers=res.etag(record.revision))


@routes.delete("/v1/accesskeys/{ref}", status=204, auth=Action("iam:accesskeys:delete"))
async def delete_access_key(request: web.Request) -> Reply:
    """Delete an access key pair."""
    return await res.delete(request, KIND)


def secret_of(keystore: KeyStore, record: Record) -> str:
    """The secret access key, for the object store's signature checks."""
    return keystore.decrypt(record.spec["secret"], context=record.id.encode()).decode()
