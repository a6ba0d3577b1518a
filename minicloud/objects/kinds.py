"""The object store's kinds (see :mod:`minicloud.core.kinds`): buckets, and the internal ``s3tenant`` that ties a
project to its RGW tenant.

- ``bucket`` (project-scoped, prefix ``bkt``): an S3 bucket of the project. The services write the spec (status
  ``creating``); the objects reconciler on the leading node makes the RGW bucket (as the project's service key),
  applies versioning, the public-read policy and the quota, and refreshes the usage in the status. A delete asks RGW
  first (a non-empty bucket is refused from RGW's ``BucketNotEmpty``), then removes the record. Buckets made through
  S3 directly (``aws s3 mb``) are adopted: the reconciler writes a record for them.
- ``s3tenant`` (internal, cluster-scoped, id ``s3t-<project id>``, name the project id): the project's RGW tenant and
  user and the *service key* minicloud acts as in that tenant (its secret sealed with the node key store, the access
  key id as associated data), and the project's quota when an administrator set one. Made by the reconciler when a
  project first has a key or a bucket (or by ``s3 quota set``); deleted (with the RGW user) after the project.

Growth: buckets are bounded by what users make; one ``s3tenant`` per project that uses the object store.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from minicloud.core.kinds import Column, Kind, Obj, declare
from minicloud.model.objects import Bucket, BucketStatus, BucketUpdate


class BucketSpec(msgspec.Struct, kw_only=True):
    versioning: bool = False
    public_read: bool = False
    quota_bytes: int = 0
    quota_objects: int = 0
    #: Delete asked (the service is asking RGW, or the reconciler will).
    deleted: bool = False
    #: Made through S3 and adopted by the reconciler.
    adopted: bool = False
    description: str = ""


class BucketObserved(msgspec.Struct, kw_only=True):
    state: Literal["creating", "ready", "deleting", "error"] = "creating"
    reason: str = ""
    size_bytes: int = 0
    objects: int = 0
    #: What RGW has now (so a change is applied once).
    versioning: str = ""  # "" | Enabled | Suspended
    observed_at: str | None = None
    #: Metering, from RGW's usage log since the bucket was made (its hour): requests, bytes sent and received.
    requests: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    #: The usage log's hourly bins that started before this time (epoch seconds) are counted in ``folded``
    #: (requests, bytes out, bytes in) and trimmed from RGW (``objects.usage_keep_days``).
    folded_before: int = 0
    folded: tuple[int, int, int] = (0, 0, 0)


def tenant_of(project_id: str) -> str:
    """The RGW tenant of a project: its id with ``_`` for ``-`` (RGW tenants are letters, digits and ``_``)."""
    return project_id.replace("-", "_")


def _render_bucket(obj: Obj[BucketSpec, BucketObserved]) -> Bucket:
    s, st = obj.spec, obj.status
    return Bucket(
        **obj.common_fields(),
        versioning=s.versioning,
        public_read=s.public_read,
        quota_bytes=s.quota_bytes,
        quota_objects=s.quota_objects,
        description=s.description,
        status=BucketStatus(
            state="deleting" if s.deleted and st.state != "error" else st.state,
            reason=st.reason,
            size_bytes=st.size_bytes,
            objects=st.objects,
            observed_at=st.observed_at,
            requests=st.requests,
            bytes_out=st.bytes_out,
            bytes_in=st.bytes_in,
        ),
    )


#: Create, delete and ``set`` are written by hand (:mod:`minicloud.objects.buckets`); list, show, patch are derived.
BUCKET = declare(
    Kind(
        name="bucket",
        plural="buckets",
        prefix="bkt",
        spec=BucketSpec,
        status=BucketObserved,
        action="storage:buckets",
        view=Bucket,
        render=_render_bucket,
        noun="bucket",
        columns=(
            Column("name", "name"),
            Column("state", "status.state"),
            Column("objects", "status.objects"),
            Column("bytes", "status.size_bytes"),
            Column("requests", "status.requests"),
            Column("versioning", "versioning"),
            Column("public", "public_read"),
            Column("id", "id"),
        ),
        patch=BucketUpdate,
        generic=frozenset({"list", "show", "patch"}),
    )
)


class S3TenantSpec(msgspec.Struct, kw_only=True):
    project_id: str
    project: str = ""
    tenant: str
    #: The RGW user owning the project's buckets: ``<tenant>$project`` (read-only keys are its subuser ``project:ro``).
    uid: str
    #: The service key minicloud acts as in the tenant (bucket create/delete): id, and secret sealed.
    access_key: str
    secret: str
    #: The project's quota on everything its buckets hold (``s3 quota set``, administrators); None: ``[objects]
    #: quota_bytes``/``quota_objects`` of the configuration; 0: unlimited.
    quota_bytes: int | None = None
    quota_objects: int | None = None


S3TENANT = declare(
    Kind(name="s3tenant", plural="s3tenants", prefix="s3t", spec=S3TenantSpec, scope="cluster", generic=frozenset())
)


def tenant_record_id(project_id: str) -> str:
    return f"{S3TENANT.prefix}-{project_id}"


__all__ = ["BUCKET", "S3TENANT", "BucketObserved", "BucketSpec", "S3TenantSpec", "tenant_of", "tenant_record_id"]
