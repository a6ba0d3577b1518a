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

from minicloud import ids
from minicloud.api import credentials
from minicloud.api import resources as res
from minicloud.api.routing import Action, Reply, Routes
from minicloud.iam import principals
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
    user, guard = await credentials.owner_of_new(request, body.user)
    owner = principals.ref_of(user)
    key_id = new_access_key_id()
    secret = base64.b64encode(os.urandom(30)).decode()  # 40 characters, like AWS secret access keys
    sealed = request.app[KEYSTORE].encrypt(secret.encode(), context=key_id.encode())
    stamp = ids.now()
    record = Record(
        kind=KIND.name, id=key_id, project=res.project_of(request), name=body.name,
        spec={"principal": owner, "description": body.description, "secret": sealed}, created_at=stamp, updated_at=stamp,
    )  # fmt: skip
    return await res.write(
        request,
        [res.Create(record), guard],
        status=201,
        kind_name=KIND.name,
        respond=lambda rev: AccessKeySecret(
            **msgspec.structs.asdict(view(msgspec.structs.replace(record, revision=rev))), secret_access_key=secret
        ),
        headers=lambda rev: {"Location": f"/v1/accesskeys/{record.id}", **res.etag(rev)},
    )


@routes.get("/v1/accesskeys/{ref}", response=AccessKey, auth=Action("iam:accesskeys:get"))
async def show_access_key(request: web.Request) -> Reply:
    """Show an access key by id or name (never its secret)."""
    record = await res.resolve(request, KIND)
    return Reply(view(record), headers=res.etag(record.revision))


@routes.delete("/v1/accesskeys/{ref}", status=204, auth=Action("iam:accesskeys:delete"))
async def delete_access_key(request: web.Request) -> Reply:
    """Delete an access key pair (one of a principal with cluster-wide roles: only that principal or a cluster
    administrator may)."""
    record = await res.resolve(request, KIND)
    await credentials.may_revoke(request, record, "access key")
    return await res.delete(request, KIND, record)


def secret_of(keystore: KeyStore, record: Record) -> str:
    """The secret access key, for the object store's signature checks."""
    return keystore.decrypt(record.spec["secret"], context=record.id.encode()).decode()
