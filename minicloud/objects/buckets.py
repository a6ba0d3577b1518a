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

import functools
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
from minicloud.core.write import Written, audit_record, commit
from minicloud.iam.tenancy import project_id_of
from minicloud.model.objects import BucketConfigure, BucketCreate, S3BucketUsage, S3Endpoint, S3QuotaSet, S3Usage
from minicloud.objects.kinds import BUCKET, S3TENANT, BucketSpec, S3TenantSpec, tenant_of, tenant_record_id
from minicloud.state import Create, Delete, Record, Store, Txn, TxnFailed, Update, list_all
from minicloud.storage import common

Bucket = Obj[BucketSpec, Any]
#: The RGW user of a tenant that owns the project's buckets (read-only keys are its subuser ``project:ro``).
PROJECT_USER = "project"
#: Service keys (minicloud's own, one per tenant) start so; IAM's access keys with ``MCAK``.
SERVICE_PREFIX = "MCSV"
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
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
    """The id of the project named ``project``; 404 when there is none."""
    pid = await project_id_of(store, project)
    if pid is None:
        raise errors.NotFound(f"no project named '{project}'")
    return pid


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


async def ensure_tenant_record(store: Store, sealer: Sealer, project: str, pid: str) -> Record | None:
    """The project's ``s3tenant`` record, written when missing (a fresh service key, its secret sealed); the
    objects reconciler makes the RGW user from it. None only if it vanished right after being written."""
    import base64
    import os
    import secrets

    rid = tenant_record_id(pid)
    record = await store.get(S3TENANT.name, rid)
    if record is not None:
        return record
    tenant = tenant_of(pid)
    access = SERVICE_PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(16))
    secret = base64.b64encode(os.urandom(30)).decode()
    spec = S3TenantSpec(
        project_id=pid, project=project, tenant=tenant, uid=f"{tenant}${PROJECT_USER}", access_key=access,
        secret=sealer.encrypt(secret.encode(), access.encode()),
    )  # fmt: skip
    obj = S3TENANT.new(project="", name=pid, spec=spec, id=rid)
    try:
        await store.commit(Txn([Create(S3TENANT.dump(obj))]))
    except TxnFailed as exc:
        if exc.reason not in ("exists", "name-taken"):
            raise
    return await store.get(S3TENANT.name, rid)


def quota_in_force(tenant: S3TenantSpec | None, default_bytes: int, default_objects: int) -> tuple[int, int, str]:
    """``(bytes, objects, source)``: the project's own quota where set, else the configuration's (0: unlimited)."""
    if tenant is None or (tenant.quota_bytes is None and tenant.quota_objects is None):
        return default_bytes, default_objects, "config"
    qb = default_bytes if tenant.quota_bytes is None else tenant.quota_bytes
    qo = default_objects if tenant.quota_objects is None else tenant.quota_objects
    return qb, qo, "project"


async def set_project_quota(
    ctx: Context, store: Store, sealer: Sealer, body: S3QuotaSet, *, default_bytes: int, default_objects: int
) -> S3Usage:
    """An administrator sets ``ctx``'s project quota (bytes, objects; 0 unlimited, None the configuration's): kept
    in the project's ``s3tenant`` record (made if missing), applied by the objects reconciler through RGW's admin
    API as the tenant user's quota — beyond it, S3 answers ``QuotaExceeded``."""
    pid = await project_id(store, ctx.project)
    changes = {k: v for k, v in msgspec.structs.asdict(body).items() if v is not msgspec.UNSET}
    for _ in range(8):
        record = await ensure_tenant_record(store, sealer, ctx.project, pid)
        if record is None:
            continue
        current = S3TENANT.load(record)
        new = current.replace(spec=msgspec.structs.replace(current.spec, **changes), updated_at=ctx.clock())
        if new.spec == current.spec:
            break
        try:
            target = {"kind": S3TENANT.name, "id": record.id, "name": record.name}
            await store.commit(Txn([
                Update(S3TENANT.dump(new), expect_revision=record.revision),
                Create(audit_record(ctx, "allowed", 200, target)),
            ]))  # fmt: skip
            break
        except TxnFailed:
            continue
    else:
        raise errors.Conflict("the project's object storage settings changed meanwhile; retry")
    return await project_usage(ctx, store, default_bytes=default_bytes, default_objects=default_objects)


async def project_usage(ctx: Context, store: Store, *, default_bytes: int, default_objects: int) -> S3Usage:
    """``ctx``'s project: the quota in force and its buckets' usage and metering (from their records)."""
    pid = await project_id(store, ctx.project)
    record = await store.get(S3TENANT.name, tenant_record_id(pid))
    tenant = S3TENANT.load(record).spec if record is not None else None
    qb, qo, source = quota_in_force(tenant, default_bytes, default_objects)
    rows = []
    for r in await list_all(store, BUCKET.name, project=ctx.project):
        b = BUCKET.load(r)
        st = b.status
        rows.append(S3BucketUsage(
            name=b.name, size_bytes=st.size_bytes, objects=st.objects, requests=st.requests, bytes_out=st.bytes_out,
            bytes_in=st.bytes_in, observed_at=st.observed_at,
        ))  # fmt: skip
    return S3Usage(
        project=ctx.project, tenant=tenant.tenant if tenant is not None else "", quota_bytes=qb, quota_objects=qo,
        quota_source=source, buckets=len(rows), size_bytes=sum(x.size_bytes for x in rows),
        objects=sum(x.objects for x in rows), requests=sum(x.requests for x in rows),
        bytes_out=sum(x.bytes_out for x in rows), bytes_in=sum(x.bytes_in for x in rows), by_bucket=rows,
    )  # fmt: skip


@dataclass(frozen=True)
class Gateway:
    """The S3 gateway a service talks to: this node's (URL and the CA its certificate chains to)."""

    url: str
    ca_file: str


async def local_gateway(store: Store, node: str, port: int, ca_file: Path) -> Gateway:
    """This node's gateway: its cluster address (loopback on a single node without node records, or while this
    node's record is not there yet)."""
    try:
        address = await common.node_address(store, node, node)
    except errors.NotFound:
        address = common.LOOPBACK
    return Gateway(url=_url(_ip(address), port), ca_file=str(ca_file))


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
    if gateway is None:
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
    # RGW has no such bucket now: the record goes whatever bookkeeping (usage, status) changed it since the mark
    return await commit(ctx, store, [Delete(kind=BUCKET.name, id=bucket.id)], status=204, label=BUCKET.label,
                        respond=lambda rev: None)  # fmt: skip


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
    nodes = await store.list(NODE.name, project="", limit=10_000)
    urls = sorted(_url(_ip(NODE.load(r).spec.address), port) for r in nodes) or [here.url]
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
        url=here.url, urls=urls, ca_bundle=ca_text(ca_file), ca_path=str(ca_file), ca_fingerprint=ca_fingerprint,
        virtual_host=f"s3.{domain}" if domain else "", tenant=tenant, aws_config=aws, rclone_config=rclone,
        enabled=enabled,
    )  # fmt: skip


def ca_text(path: Path) -> str:
    """The CA bundle's text ("" when it cannot be read), read again only when the file changes (a node that joins
    a cluster gets the cluster's CA)."""
    try:
        return _ca_text(str(path), Path(path).stat().st_mtime_ns)
    except OSError:
        return ""


@functools.lru_cache(maxsize=4)
def _ca_text(path: str, mtime_ns: int) -> str:
    return Path(path).read_text()


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
    "ensure_tenant_record",
    "local_gateway",
    "project_id",
    "project_usage",
    "quota_in_force",
    "set_project_quota",
]
