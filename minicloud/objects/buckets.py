"""Buckets and the S3 endpoint: the services behind ``/v1/buckets`` and ``/v1/s3/endpoint`` (list, show and the
description/labels patch are generic).

A bucket is a record (:data:`~minicloud.objects.kinds.BUCKET`) and an RGW bucket of the project's tenant: create
writes the record (``creating``) and the objects reconciler on the leading node makes the RGW bucket. Delete asks
the gateway of the node that answers, as the project's service key, so a bucket that still holds objects is refused
from RGW's own answer (``BucketNotEmpty`` → 409); the record is marked ``deleted`` first (compare-and-swap) so the
reconciler does not make the bucket again meanwhile, and unmarked when RGW refuses. When no gateway answers, the
record stays marked and the reconciler finishes the delete.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from minicloud import errors
from minicloud.cluster.kinds import NODE
from minicloud.core import crud
from minicloud.core.context import Context, Sealer
from minicloud.core.kinds import Obj
from minicloud.core.write import Written
from minicloud.iam.kinds import PROJECT
from minicloud.iam.principals import DEFAULT_PROJECT, DEFAULT_PROJECT_ID
from minicloud.model.objects import BucketConfigure, BucketCreate, S3Endpoint
from minicloud.objects.kinds import BUCKET, S3TENANT, BucketSpec, tenant_of, tenant_record_id
from minicloud.state import Store, Txn, TxnFailed, Update
from minicloud.storage import common

Bucket = Obj[BucketSpec, Any]
LOOPBACK = "127.0.0.1"
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


def bucket_name_problem(name: str) -> str | None:
    """Why S3 refuses ``name`` as a bucket name (AWS's rules, which RGW enforces), or None."""
    if not 3 <= len(name) <= 63:
        return f"a bucket name has 3 to 63 characters ({len(name)} given)"
    if name != name.lower():
        return "a bucket name has no upper-case letters"
    if not re.fullmatch(r"[a-z0-9.-]+", name):
        return "a bucket name has only lower-case letters, digits, '.' and '-'"
    if not (name[0].isalnum() and name[-1].isalnum()):
        return "a bucket name starts and ends with a letter or a digit"
    if ".." in name or ".-" in name or "-." in name:
        return "a bucket name has no '..', '.-' or '-.'"
    try:
        ipaddress.IPv4Address(name)
        return "a bucket name is not an IP address"
    except ValueError:
        pass
    if name.startswith("xn--") or name.endswith("-s3alias"):
        return "a bucket name does not start with 'xn--' nor end with '-s3alias'"
    if not all(_LABEL.match(part) for part in name.split(".")):
        return "each '.'-separated part of a bucket name starts and ends with a letter or a digit"
    return None


async def project_id(store: Store, project: str) -> str:
    """The id of the project named ``project`` (``default`` has a fixed id and no record)."""
    if project == DEFAULT_PROJECT:
        return DEFAULT_PROJECT_ID
    record = await store.get_by_name(PROJECT.name, "", project)
    if record is None:
        raise errors.NotFound(f"no project named '{project}'")
    return record.id


async def create_bucket(ctx: Context, store: Store, body: BucketCreate) -> Written:
    """A bucket in ``ctx``'s project; the objects reconciler makes it in RGW (``creating`` → ``ready``)."""
    problem = bucket_name_problem(body.name)
    if problem is not None:
        raise errors.BadRequest(f"'{body.name}' is not a valid bucket name: {problem}")
    await common.require_ceph(store)
    spec = BucketSpec(
        versioning=body.versioning,
        public_read=body.public_read,
        quota_bytes=body.quota_bytes,
        quota_objects=body.quota_objects,
        description=body.description,
    )
    obj = BUCKET.new(project=ctx.project, name=body.name, spec=spec, labels=body.labels, stamp=ctx.clock())
    return await crud.create(ctx, store, BUCKET, obj)


async def configure_bucket(ctx: Context, store: Store, ref: str, body: BucketConfigure) -> Written:
    """Change versioning, public read and the quota (only the fields given); the reconciler applies them."""

    def mutate(obj: Bucket) -> Bucket:
        if obj.spec.deleted:
            raise errors.Conflict(f"bucket '{obj.name}' is being deleted")
        changes = {k: v for k, v in msgspec.structs.asdict(body).items() if v is not msgspec.UNSET}
        return obj.replace(spec=msgspec.structs.replace(obj.spec, **changes))

    return await crud.update(ctx, store, BUCKET, ref, mutate)


@dataclass(frozen=True)
class Gateway:
    """The S3 gateway a service talks to: this node's (URL and the CA its certificate chains to)."""

    url: str
    ca_file: str


async def local_gateway(store: Store, node: str, port: int, ca_file: Path) -> Gateway:
    """This node's gateway: its cluster address (loopback on a single node without node records)."""
    record = await store.get_by_name(NODE.name, "", node)
    address = _ip(NODE.load(record).spec.address) if record is not None else LOOPBACK
    return Gateway(url=_url(address, port), ca_file=str(ca_file))


async def delete_bucket(
    ctx: Context, store: Store, sealer: Sealer, ref: str, gateway: Gateway | None, *, expect: int | None = None
) -> Written:
    """Delete a bucket: RGW first (409 when it holds objects, from RGW's ``BucketNotEmpty``), then the record."""
    from minicloud.objects.rgwclient import RgwClient, S3Error, ssl_context

    bucket = await crud.get(ctx, store, BUCKET, ref)
    if expect is not None and expect != bucket.revision:
        raise errors.PreconditionFailed("the bucket was changed since the revision you sent in If-Match")
    tenant_rec = await store.get(S3TENANT.name, tenant_record_id(await project_id(store, ctx.project)))
    if tenant_rec is None:  # never made in RGW: the project has no tenant yet
        return await crud.delete_obj(ctx, store, BUCKET, bucket)
    marked = bucket.replace(spec=msgspec.structs.replace(bucket.spec, deleted=True), updated_at=ctx.clock())
    if not bucket.spec.deleted:
        # bookkeeping (not audited, like a project's ``deleting`` mark): the delete itself is audited below
        marked = marked.replace(revision=await _cas(store, marked, bucket.revision))
    if gateway is None or tenant_rec is None:
        return _accepted(marked)
    tenant = S3TENANT.load(tenant_rec).spec
    secret = sealer.decrypt(tenant.secret, tenant.access_key.encode()).decode()
    try:
        async with RgwClient(gateway.url, tenant.access_key, secret, ssl_ctx=ssl_context(gateway.ca_file)) as s3:
            await s3.request("DELETE", f"/{bucket.name}", ok=(404,))
    except S3Error as exc:
        if exc.code == "BucketNotEmpty":
            await _unmark(store, bucket.id, ctx.clock())
            raise errors.Conflict(
                f"bucket '{bucket.name}' is not empty (S3: BucketNotEmpty); delete its objects (and, with versioning, "
                f"their versions) first, e.g. `aws s3 rm --recursive s3://{bucket.name}`"
            ) from None
        return _accepted(marked)  # the reconciler retries
    except (OSError, TimeoutError):
        return _accepted(marked)  # no gateway here answers: the reconciler deletes it
    return await crud.delete_obj(ctx, store, BUCKET, marked)


async def _cas(store: Store, obj: Bucket, revision: int) -> int:
    try:
        rev, _ = await store.commit(Txn([Update(BUCKET.dump(obj), expect_revision=revision)]))
    except TxnFailed:
        raise errors.Conflict(f"bucket '{obj.name}' changed while it was being deleted; retry") from None
    return int(rev)


async def _unmark(store: Store, bucket_id: str, stamp: str) -> None:
    """Clear ``deleted`` (a compare-and-swap on a fresh read; the reconciler may have cleared it already)."""
    for _ in range(8):
        record = await store.get(BUCKET.name, bucket_id)
        if record is None:
            return
        current = BUCKET.load(record)
        if not current.spec.deleted:
            return
        unmarked = current.replace(spec=msgspec.structs.replace(current.spec, deleted=False), updated_at=stamp)
        try:
            await store.commit(Txn([Update(BUCKET.dump(unmarked), expect_revision=current.revision)]))
            return
        except TxnFailed:
            continue


def _accepted(bucket: Bucket) -> Written:
    return Written(revision=bucket.revision, status=202, body=BUCKET.to_view(bucket))


async def endpoint(
    ctx: Context, store: Store, *, node: str, port: int, domain: str, ca_file: Path, ca_fingerprint: str,
    access_key: str = "", enabled: bool = True,
) -> S3Endpoint:  # fmt: skip
    """How to reach S3 from ``ctx``'s project: the gateways' URLs, the CA, and client settings for a key."""
    here = await local_gateway(store, node, port, ca_file)
    urls = sorted(_url(_ip(NODE.load(r).spec.address), port) for r in await common_nodes(store)) or [here.url]
    pid = await project_id(store, ctx.project)
    tenant = tenant_of(pid) if await store.get(S3TENANT.name, tenant_record_id(pid)) is not None else ""
    key = access_key or "MCAK…"
    aws = (
        f"# ~/.aws/config\n[profile minicloud]\nregion = us-east-1\nendpoint_url = {here.url}\nca_bundle = {ca_file}\n"
        "s3 =\n    addressing_style = path\nrequest_checksum_calculation = when_required\n"
        "response_checksum_validation = when_required\n"
        f"# ~/.aws/credentials\n[minicloud]\naws_access_key_id = {key}\naws_secret_access_key = <secret>\n"
    )
    rclone = (
        f"[minicloud]\ntype = s3\nprovider = Ceph\naccess_key_id = {key}\nsecret_access_key = <secret>\n"
        f"endpoint = {here.url}\nregion = us-east-1\n# run rclone with --ca-cert {ca_file}\n"
    )
    return S3Endpoint(
        url=here.url, urls=urls, ca_bundle=_read(ca_file), ca_path=str(ca_file), ca_fingerprint=ca_fingerprint,
        virtual_host=f"s3.{domain}" if domain else "", tenant=tenant, aws_config=aws, rclone_config=rclone,
        enabled=enabled,
    )  # fmt: skip


def _read(path: Path) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


async def common_nodes(store: Store) -> list[Any]:
    return list(await store.list(NODE.name, project="", limit=10_000))


def _ip(address: str) -> str:
    text = address.strip()
    for candidate in (text, text.rsplit(":", 1)[0].strip("[]")):
        try:
            return str(ipaddress.ip_address(candidate))
        except ValueError:
            continue
    return text


def _url(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"https://{host}:{port}"


__all__ = [
    "Gateway",
    "bucket_name_problem",
    "configure_bucket",
    "create_bucket",
    "delete_bucket",
    "endpoint",
    "local_gateway",
    "project_id",
]
