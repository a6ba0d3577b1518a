"""The object store's public shapes: buckets and the S3 endpoint (``/v1/buckets``, ``/v1/s3/endpoint``)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from minicloud.model import Description, Labels, Resource

#: What a bucket create accepts before the S3 rules are checked (the service says which rule a name breaks).
BucketName = Annotated[str, Meta(min_length=1, max_length=255)]
#: Bytes or objects; 0 = no limit.
Quota = Annotated[int, Meta(ge=0, le=1 << 62)]


class BucketStatus(msgspec.Struct, kw_only=True):
    state: Literal["creating", "ready", "deleting", "error"] = "creating"
    reason: str = ""
    #: Usage as RGW last reported it (refreshed about every 30 s).
    size_bytes: int = 0
    objects: int = 0
    observed_at: str | None = None
    #: Metering from RGW's usage log since the bucket was made: requests (anonymous ones too), bytes sent to clients
    #: and received from them. Refreshed with the usage above.
    requests: int = 0
    bytes_out: int = 0
    bytes_in: int = 0


class Bucket(Resource, kw_only=True):
    """An S3 bucket of the project (an RGW bucket of the project's tenant)."""

    versioning: bool = False
    public_read: bool = False
    #: Per-bucket quota; 0 = none.
    quota_bytes: int = 0
    quota_objects: int = 0
    #: The project's RGW tenant (anonymous and cross-project URLs name the bucket ``TENANT:BUCKET``).
    tenant: str = ""
    description: str = ""
    status: BucketStatus = msgspec.field(default_factory=BucketStatus)


class BucketCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: BucketName
    versioning: bool = False
    #: Anyone may read its objects (GET) without a key; listing stays private.
    public_read: bool = False
    quota_bytes: Quota = 0
    quota_objects: Quota = 0
    description: Description = ""
    labels: Labels = {}


class BucketUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    description: Description | UnsetType = UNSET
    labels: Labels | UnsetType = UNSET


class BucketConfigure(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``bucket set``: only the fields given change."""

    versioning: bool | UnsetType = UNSET
    public_read: bool | UnsetType = UNSET
    quota_bytes: Quota | UnsetType = UNSET
    quota_objects: Quota | UnsetType = UNSET


class S3Endpoint(msgspec.Struct, kw_only=True):
    """How to reach the object store from this project."""

    #: The gateway of the node that answered, and every node's.
    url: str
    urls: list[str] = []
    #: The cluster CA certificate (PEM) the gateways' certificates chain to, its path on the answering node, and its
    #: fingerprint.
    ca_bundle: str = ""
    ca_path: str = ""
    ca_fingerprint: str = ""
    #: Any region works; clients need one.
    region: str = "us-east-1"
    #: ``s3.DOMAIN`` for virtual-hosted-style addressing ("" : path style only).
    virtual_host: str = ""
    #: The project's RGW tenant ("" until the project has a key or bucket).
    tenant: str = ""
    #: Ready-made client settings for an access key (its id, with the secret left for the user to fill in).
    aws_config: str = ""
    rclone_config: str = ""
    enabled: bool = True


class S3QuotaSet(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``s3 quota set``: the project's quota on everything its buckets hold (only the fields given change); 0:
    unlimited, null: back to the configuration's ``[objects] quota_bytes``/``quota_objects``."""

    quota_bytes: Quota | UnsetType | None = UNSET
    quota_objects: Quota | UnsetType | None = UNSET


class S3BucketUsage(msgspec.Struct, kw_only=True):
    name: str
    size_bytes: int = 0
    objects: int = 0
    requests: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    observed_at: str | None = None


class S3Usage(msgspec.Struct, kw_only=True):
    """A project's object storage: its quota and what its buckets hold and served (sums of the buckets' figures,
    as RGW last reported them, about every 30 s)."""

    project: str
    #: The project's RGW tenant ("" until the project has a key or bucket).
    tenant: str = ""
    #: The quota in force (0: unlimited) and where it comes from: ``project`` (``s3 quota set``) or ``config``.
    quota_bytes: int = 0
    quota_objects: int = 0
    quota_source: Literal["project", "config"] = "config"
    buckets: int = 0
    size_bytes: int = 0
    objects: int = 0
    requests: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    by_bucket: list[S3BucketUsage] = []


__all__ = [
    "Bucket",
    "BucketConfigure",
    "BucketCreate",
    "BucketStatus",
    "BucketUpdate",
    "S3BucketUsage",
    "S3Endpoint",
    "S3QuotaSet",
    "S3Usage",
]
