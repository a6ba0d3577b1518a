"""Request and response types shared by the server, the SDK and the OpenAPI document.

Every type here is a msgspec ``Struct``: the server decodes request bodies into them (strictly: unknown fields and
wrong types are errors), encodes responses from them, and ``GET /v1/openapi.json`` is generated from them. The SDK
decodes responses with the very same types.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

import msgspec
from msgspec import UNSET, Meta, UnsetType

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
LABEL_KEY_PATTERN = r"^[a-z0-9]([a-z0-9._/-]{0,61}[a-z0-9])?$"
#: A resource name: 1-63 characters, letters, digits, '-', '_' and '.', starting with a letter or digit.
Name = Annotated[
    str,
    Meta(
        pattern=NAME_PATTERN,
        description="1-63 letters, digits, '-', '_' or '.', starting with a letter or digit",
        examples=["web-1"],
    ),
]
LabelKey = Annotated[str, Meta(pattern=LABEL_KEY_PATTERN, description="lowercase, 1-63 of a-z 0-9 . _ / -")]
LabelValue = Annotated[str, Meta(max_length=255, pattern=r"^[^\x00-\x1f\x7f]*$")]
Labels = Annotated[dict[LabelKey, LabelValue], Meta(max_length=64)]
Description = Annotated[str, Meta(max_length=255, pattern=r"^[^\x00-\x08\x0b-\x1f\x7f]*$")]

T = TypeVar("T")


class Problem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """RFC 9457 problem details: every error response has this body (``application/problem+json``)."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    invalid_params: list[dict[str, str]] = []
    request_id: str | None = None


class Page(msgspec.Struct, Generic[T], kw_only=True):
    """One page of a collection. Pass ``next_cursor`` back as ``?cursor=`` for the next page; null at the end."""

    items: list[T]
    next_cursor: str | None = None


class Resource(msgspec.Struct, kw_only=True):
    """Fields every resource has."""

    id: str
    name: str
    project: str
    labels: dict[str, str] = {}
    revision: int
    created_at: str
    updated_at: str


# -- key pairs -----------------------------------------------------------------------------------------------------
class KeyPair(Resource, kw_only=True):
    """An SSH public key that compute injects into guests."""

    type: str
    fingerprint: str
    public_key: str
    comment: str = ""
    description: str = ""


class KeyPairCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Name
    public_key: Annotated[str, Meta(min_length=1, max_length=16384, description="one OpenSSH public key line")]
    description: Description = ""
    labels: Labels = {}


class KeyPairUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """JSON merge patch of a key pair: only the given fields change."""

    description: Description | UnsetType = UNSET
    labels: Labels | UnsetType = UNSET


# -- operations ----------------------------------------------------------------------------------------------------
class Progress(msgspec.Struct, kw_only=True):
    done: int = 0
    total: int = 0
    message: str = ""


class Operation(Resource, kw_only=True):
    """Long-running work. Poll ``GET /v1/operations/{id}?wait=SECONDS`` until ``state`` is no longer ``running``."""

    action: str
    target: dict[str, str] = {}
    node: str
    state: Literal["running", "succeeded", "failed"]
    progress: Progress = msgspec.field(default_factory=Progress)
    result: dict[str, Any] | None = None
    error: Problem | None = None


# -- API keys (bootstrap credentials until IAM) ------------------------------------------------------------------
class ApiKey(Resource, kw_only=True):
    description: str = ""
    prefix: str
    #: ``user:usr-…``: the principal the key acts as, by id.
    principal: str = "user:usr-admin"
    expires_at: str | None = None
    #: When the key last authenticated a request (written at most once a minute per key; null: never).
    last_used_at: str | None = None


class ApiKeyCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Default: ``<user>-<random>``.
    name: Name | None = None
    #: The user the key acts as (default: the caller, or ``admin`` for local root).
    user: Name | None = None
    description: Description = ""
    expires_in: Annotated[int, Meta(ge=60, le=10 * 365 * 86400, description="lifetime in seconds")] | None = None
    labels: Labels = {}


class ApiKeySecret(ApiKey, kw_only=True):
    """Returned once, at creation: ``secret`` is the bearer token; it is stored only as a hash."""

    secret: str


# -- system --------------------------------------------------------------------------------------------------------
class Version(msgspec.Struct, kw_only=True):
    version: str
    api: str
    node: str
    ca_fingerprint: str


class CACertificate(msgspec.Struct, kw_only=True):
    fingerprint: str
    pem: str


class Health(msgspec.Struct, kw_only=True):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = {}


class Disk(msgspec.Struct, kw_only=True):
    mountpoint: str
    device: str
    fstype: str
    total_bytes: int
    free_bytes: int


class Virtualization(msgspec.Struct, kw_only=True):
    kvm_device: bool
    hardware_virt: bool
    virt_type: Literal["kvm", "qemu"]
    reason: str


class NodeGpus(msgspec.Struct, kw_only=True):
    """A summary of the node's GPUs (``gpu list`` has each one)."""

    count: int = 0
    #: How many can be passed through (IOMMU on, a group of their own).
    capable: int = 0
    #: ``2 x H100 80GB HBM3`` per model.
    models: list[str] = []
    #: Why there are none, or why NVML cannot be used ("" when it can).
    reason: str = ""
    driver_version: str = ""


class Node(msgspec.Struct, kw_only=True):
    """Facts about the node that answered, read from the host with psutil."""

    name: str
    hostname: str
    kernel: str
    os: str
    arch: str
    cpu_count: int
    cpu_model: str
    memory_total_bytes: int
    memory_available_bytes: int
    load_average: list[float]
    boot_time: str
    disks: list[Disk]
    virtualization: Virtualization
    version: str
    #: None where GPU discovery has not run (``gpu.enabled = false``, or not yet).
    gpus: NodeGpus | None = None


class Event(msgspec.Struct, kw_only=True):
    """One message of ``GET /v1/events``: a resource was created, updated or deleted at ``revision``."""

    revision: int
    type: Literal["created", "updated", "deleted"]
    kind: str
    id: str
    project: str
    object: dict[str, Any]


# -- cluster -------------------------------------------------------------------------------------------------------
NodeName = Annotated[str, Meta(pattern=NAME_PATTERN, description="a node name")]


class ClusterMember(msgspec.Struct, kw_only=True):
    name: str
    address: str
    zone: str = ""
    role: str
    status: Literal["online", "offline"]
    online_since: str | None = None
    last_contact: str | None = None
    etcd_member_id: str = ""
    leader: bool = False


class EtcdStorage(msgspec.Struct, kw_only=True):
    """One etcd member's database against its quota (``cluster.etcd_quota_bytes``); ``warning`` says what to do."""

    member: str
    db_size_bytes: int
    db_in_use_bytes: int
    quota_bytes: int
    used_percent: float
    alarms: list[str] = []
    warning: str | None = None


class ClusterInfo(msgspec.Struct, kw_only=True):
    """The cluster as the answering node sees it. ``leader`` holds the cluster-services leadership."""

    enabled: bool
    node: str
    leader: str | None = None
    etcd_leader: str | None = None
    quorum: bool = True
    revision: int = 0
    members: list[ClusterMember] = []
    storage: list[EtcdStorage] = []


Zone = Annotated[str, Meta(pattern=r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)?$", description="failure domain")]


class ClusterSetting(msgspec.Struct, kw_only=True):
    """A cluster-wide setting (``minicloud cluster settings``). Set (``source`` ``cluster``): the same value on every
    node, kept in the replicated state. Never set (``source`` ``node-config``): each node answering a request uses
    its own configuration file's ``config_key`` (``value`` is the answering node's)."""

    name: str
    value: str
    source: Literal["cluster", "node-config"]
    #: The configuration file key that applies while the setting was never set (``compute.scheduler_weigher``).
    config_key: str
    choices: list[str] = []
    description: str = ""
    #: The setting's record (empty while it was never set); ``revision`` is its ETag for ``If-Match``.
    id: str = ""
    revision: int = 0
    updated_at: str | None = None


class ClusterSettingSet(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``PUT /v1/cluster/settings/{name}``: the value, one of the setting's ``choices``."""

    value: Annotated[str, Meta(min_length=1, max_length=255, pattern=r"^[^\x00-\x1f\x7f]*$")]


class ClusterEnable(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    zone: Zone = ""


class JoinTokenCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    node: NodeName
    role: Literal["auto", "voter", "learner"] = "auto"
    zone: Zone = ""
    ttl: Annotated[int, Meta(ge=60, le=7 * 86400, description="seconds the token stays valid")] = 3600


class JoinTokenIssued(msgspec.Struct, kw_only=True):
    """A one-time join token: give it to `minicloud join` on the new node. Shown only once."""

    token: str
    node: str
    expires_at: str


class ClusterJoin(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    token: Annotated[str, Meta(min_length=1, max_length=4096)]


class JoinRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Sent by a joining node's agent to a cluster member (authenticated by the one-time token)."""

    token: Annotated[str, Meta(max_length=4096)]
    csr: Annotated[str, Meta(max_length=16384)]
    node: NodeName
    client_time: Annotated[str, Meta(max_length=64)]
    peer_url: Annotated[str, Meta(max_length=256)]
    client_url: Annotated[str, Meta(max_length=256)]
    address: Annotated[str, Meta(max_length=256)]
    # The joining node's HTTPS URL (https://ADDRESS:PORT), recorded so that other nodes reach its API (metrics
    # scrapes, log and query forwarding); "" when it serves no HTTPS.
    https: Annotated[str, Meta(max_length=300)] = ""


class JoinReply(msgspec.Struct, kw_only=True):
    certificate: str
    ca_certificate: str
    ca_key: str
    session_key: str
    keystore: dict[str, str]
    initial_cluster: dict[str, str]
    endpoints: list[str]
    role: str


# -- projects and audit --------------------------------------------------------------------------------------------
class Project(Resource, kw_only=True):
    description: str = ""


class ProjectCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Name
    description: Description = ""
    labels: Labels = {}


class ProjectUpdate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    description: Description | UnsetType = UNSET
    labels: Labels | UnsetType = UNSET


class AuditEntry(msgspec.Struct, kw_only=True):
    """One audit log entry: who did what, in which project, to what, with which outcome."""

    id: str
    time: str
    principal: str
    project: str
    action: str
    method: str
    path: str
    target: dict[str, str] = {}
    result: Literal["allowed", "denied", "failed"]
    status: int
    request_id: str
    source: str
    #: How many requests this entry stands for: refusals (401, 429) are recorded once per source and minute.
    count: int = 1


# -- users and role bindings ---------------------------------------------------------------------------------------
class User(Resource, kw_only=True):
    email: str = ""
    type: Literal["user", "serviceaccount"] = "user"
    has_password: bool = False


class UserCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Name
    email: Annotated[str, Meta(max_length=254, pattern=r"^([^@\s]+@[^@\s]+)?$")] = ""
    type: Literal["user", "serviceaccount"] = "user"
    password: Annotated[str, Meta(max_length=1024)] | None = None
    labels: Labels = {}


class RoleBinding(Resource, kw_only=True):
    #: ``user:usr-…`` / ``serviceaccount:usr-…``: the principal by id (``principal_name`` is its name, for reading).
    principal: str
    principal_name: str = ""
    role: str
    scope_project: str | None = None
    #: The project's id: the binding belongs to that project, and goes when it is deleted.
    scope_project_id: str | None = None


class RoleBindingCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    role: Name
    #: ``user:NAME`` or ``user:usr-ID`` (``serviceaccount:…`` likewise); stored by id.
    principal: Annotated[str, Meta(pattern=r"^(user|serviceaccount):[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]
    #: The project the role applies in; null binds it cluster-wide (required for ``admin``).
    scope_project: Name | None = None


class RoleInfo(msgspec.Struct, kw_only=True):
    name: str
    scope: str
    description: str = ""
    builtin: bool = True
    statements: list[dict[str, Any]] = []


class LoginRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    user: Annotated[str, Meta(max_length=63)]
    password: Annotated[str, Meta(max_length=1024)]
    ttl: Annotated[int, Meta(ge=60, le=12 * 3600, description="session lifetime in seconds")] = 3600


class Session(msgspec.Struct, kw_only=True):
    """A session token for ``Authorization: Bearer``; shown once. ``POST /v1/auth/logout`` revokes it."""

    token: str
    session_id: str
    principal: str
    expires_at: str


class AccessKey(Resource, kw_only=True):
    """An S3-style key pair for the object store: ``id`` is the access key id."""

    principal: str
    description: str = ""
    #: Refused by the object store until enabled again.
    disabled: bool = False
    #: RFC 3339 UTC; refused by the object store from then on. Empty: no expiry.
    expires_at: str = ""


class AccessKeyCreate(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: Name
    user: Name | None = None
    description: Description = ""
    #: Lifetime in seconds (at most 10 years); or ``expires_at``, not both. Default: no expiry.
    expires_in: Annotated[int, Meta(ge=60, le=10 * 365 * 86400, description="lifetime in seconds")] | None = None
    #: RFC 3339 time, in the future and at most 10 years away.
    expires_at: Annotated[str, Meta(max_length=40)] | None = None


class AccessKeySecret(AccessKey, kw_only=True):
    """Returned once: the secret access key is kept only encrypted (node key store) and never shown again."""

    secret_access_key: str


# -- who am I --------------------------------------------------------------------------------------------------------
class WhoAmIBinding(msgspec.Struct, kw_only=True):
    """One role the caller holds: in ``project`` (its name), or cluster-wide (``project`` null: every project)."""

    role: str
    project: str | None = None


class WhoAmICredential(msgspec.Struct, kw_only=True):
    """The credential this request used: an API key, a login session, or the node's root Unix socket."""

    type: Literal["apikey", "session", "socket"]
    #: The API key's or session's id (null on the socket).
    id: str | None = None
    #: The API key's name (API keys only).
    name: str | None = None
    #: When it stops working (null: never, or the socket).
    expires_at: str | None = None


class WhoAmI(msgspec.Struct, kw_only=True):
    """``GET /v1/whoami``: who the caller is here, what it may do, and with which credential (like
    ``aws sts get-caller-identity``). Any authenticated caller may ask."""

    #: The reference that role bindings and the audit log use (``user:…``, ``serviceaccount:…``, ``local:root``).
    principal: str
    kind: Literal["user", "serviceaccount", "local"]
    #: The user's or service account's id (null for local root).
    id: str | None = None
    name: str
    #: True when the caller may do everything (local root, or the ``admin`` role cluster-wide).
    admin: bool = False
    bindings: list[WhoAmIBinding] = []
    #: Names of the projects the caller holds a role in (cluster-wide roles reach every project; see ``bindings``).
    projects: list[str] = []
    credential: WhoAmICredential
    #: The node that answered, and the fingerprint of its cluster CA.
    node: str
    ca_fingerprint: str
