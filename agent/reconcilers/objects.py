"""The objects reconciler: this node's S3 gateway, and RGW's users, keys, buckets and quotas made to match IAM.

Keys (on the framework of :mod:`agent.reconcile`):

- :data:`GATEWAY_KEY`, on **every** node with Ceph: once the ``cephcluster`` record is ready and this node has the
  cluster's keys (the storage reconciler installs them), run this node's ``radosgw`` (:mod:`agent.storage.rgw`:
  pools made up front, its own cephx key, TLS with the node certificate, the cluster address and ``[objects] port``)
  and look at it again every :data:`SUPERVISE` seconds (restarted when it is gone; a new agent adopts it).
- Everything else runs on **one** node only — the one that writes the ``cephcluster`` status (the bootstrap node,
  else the first MON node by name that is not offline: the storage reconciler's rule, recomputed here), because
  RGW's metadata is cluster-wide. It acts through RGW's admin ops API on its own gateway (SigV4,
  :mod:`minicloud.objects.rgwclient`) as the ``minicloud-admin`` RGW user (made with ``radosgw-admin``).

  - an access key id (``MCAK…``): the key belongs to RGW user ``<tenant>$project`` (read-write: the principal may
    ``storage:buckets:create`` in the project, i.e. ``member``/``owner``) or to its subuser ``project:ro``
    (read-only: it may only read, ``viewer``), or to none (no role there any more, disabled, expired, or the record
    deleted: the key is removed from RGW). Outside the default project the role must come from a binding *on the
    project*: a cluster-wide role (``admin``) alone opens no project's buckets (the grant is such a binding). The
    tenant of project ``P`` is ``P``'s id with ``_`` for ``-``
    (:func:`~minicloud.objects.kinds.tenant_of`), made on first need with an ``s3tenant`` record holding the sealed
    *service key* minicloud acts as in it. A revoked key is refused by every gateway as soon as the admin call
    returns (RGW's metadata cache is invalidated cluster-wide by watch/notify).
  - :data:`KEYS_KEY` (a role binding or custom role changed): every access key again.
  - a bucket id: make the RGW bucket as the service key, apply versioning, the public-read policy and the bucket
    quota; a bucket marked ``deleted`` is deleted (``BucketNotEmpty``: unmarked, with the reason).
  - ``s3t-<project id>``: a project that is gone takes its RGW user (purged) and tenant record with it.
  - :data:`SYNC_KEY`, every :data:`SYNC` seconds: per tenant, the project quota (its own from ``s3 quota set``, else
    ``[objects]``), the buckets' usage and metering (RGW's usage log: requests, bytes out and in) into their status,
    buckets made through S3 adopted as records, RGW keys no record names removed. An ``s3tenant`` change (a quota
    set) is applied at once. Retention of the usage log: bins older than ``objects.usage_keep_days`` are first
    folded into each bucket's status (``folded``/``folded_before``, written with the totals in one compare-and-swap,
    so a crash before the trim counts nothing twice), then trimmed from RGW (``DELETE /admin/usage``).

What RGW refuses for a bucket goes into its status; other errors propagate and the framework retries with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from agent.reconcile import Result, update_record
from minicloud import ids
from minicloud.cluster.kinds import NODE
from minicloud.config import Config
from minicloud.iam.kinds import ACCESSKEY, PROJECT, ROLE, ROLEBINDING
from minicloud.iam.principals import DEFAULT_PROJECT, DEFAULT_PROJECT_ID
from minicloud.iam.tenancy import project_id_of
from minicloud.objects.buckets import PROJECT_USER, SERVICE_PREFIX, ensure_tenant_record, quota_in_force
from minicloud.objects.kinds import BUCKET, S3TENANT, BucketSpec, S3TenantSpec, tenant_record_id
from minicloud.objects.rgwclient import RgwClient, S3Error, ssl_context
from minicloud.state import Change, Create, Delete, Record, Store, Txn, TxnFailed, list_all
from minicloud.storage.kinds import CEPH, CEPH_NAME, CephSpec

log = logging.getLogger("minicloud.objects.node")

GATEWAY_KEY = ":gateway"
SYNC_KEY = ":sync"
KEYS_KEY = ":keys"
#: Seconds between two looks at this node's gateway.
SUPERVISE = 10.0
#: Seconds between two syncs of quotas, usage and stray keys (the leading node).
SYNC = 30.0
RETRY = 5.0
#: Seconds a bucket marked ``deleted`` is left to the service that marked it before this node deletes it.
DELETE_GRACE = 20.0
#: The read-only subuser of a tenant's RGW user.
READONLY_SUBUSER = "ro"
#: What a principal needs in the project for a read-write key, and for a read-only one.
WRITE_ACTION = "storage:buckets:create"
READ_ACTION = "storage:buckets:get"
_XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"


def uid_of(tenant: str) -> str:
    return f"{tenant}${PROJECT_USER}"


def public_read_policy(tenant: str, bucket: str) -> str:
    """The bucket policy ``--public-read`` sets: anyone may GET its objects (not list them)."""
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "minicloud-public-read",
                    "Effect": "Allow",
                    "Principal": "*",
                    "Action": ["s3:GetObject"],
                    "Resource": [f"arn:aws:s3::{tenant}:{bucket}/*"],
                }
            ],
        },
        separators=(",", ":"),
    )


def wanted_mode(*, may_write: bool, may_read: bool, disabled: bool = False, expired: bool = False) -> str | None:
    """Which RGW identity an access key gets: ``rw``, ``ro`` or None (not in RGW)."""
    if disabled or expired:
        return None
    if may_write:
        return "rw"
    return "ro" if may_read else None


def project_granted(principal: str, action: str, project: str, bindings: Iterable[Any], roles: Any) -> bool:
    """``action`` in ``project`` granted by the principal's bindings *on the project* (cluster-wide ones ignored)."""
    from minicloud.iam import policy

    own = [b for b in bindings if b.project is not None]
    return policy.evaluate(principal, action, project, own, roles).allowed


def _ip(address: str) -> str:
    text = address.strip()
    for candidate in (text, text.rsplit(":", 1)[0].strip("[]")):
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(candidate))
    return text


def _expired(expires_at: Any) -> bool:
    if not expires_at:
        return False
    return str(expires_at) <= ids.now()


class ObjectsReconciler:
    """See the module docstring. ``rgw_factory(engine, settings)`` makes the gateway runner (tests: a fake)."""

    name = "objects"
    kinds = frozenset(
        {CEPH.name, NODE.name, ACCESSKEY.name, ROLEBINDING.name, ROLE.name, PROJECT.name, BUCKET.name, S3TENANT.name}
    )

    def __init__(
        self,
        *,
        store: Store,
        config: Config,
        keystore: Any,
        directory: Any,
        engine_factory: Callable[..., Any] | None = None,
        rgw_factory: Callable[..., Any] | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.node = config.node_name
        self.keystore = keystore
        self.directory = directory
        if engine_factory is None:
            from agent.reconcilers.storage import real_engine_factory

            engine_factory = real_engine_factory(config)
        self.engine_factory = engine_factory
        self.rgw_factory = rgw_factory or _real_rgw
        self.pki = config.data_path / "pki"
        self._enqueue: Callable[[str], None] = lambda key: None
        self._rgw: Any = None
        self._signature: tuple[Any, ...] | None = None
        self._pools_done = False
        self._leading = False
        self._admin: RgwClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the framework's side ----------------------------------------------------------------------------------------
    async def start(self, enqueue: Callable[[str], None]) -> None:
        self._enqueue = enqueue

    async def close(self) -> None:
        """The gateway outlives the agent on purpose (a new agent adopts it)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._admin is not None:
            await self._admin.close()

    def keys_for(self, change: Change) -> Iterable[str]:
        kind = change.kind
        if kind in (CEPH.name, NODE.name):
            return [GATEWAY_KEY]
        if kind in (ACCESSKEY.name, BUCKET.name):
            return [change.id]
        if kind in (ROLEBINDING.name, ROLE.name):
            return [KEYS_KEY]
        if kind == PROJECT.name and change.type == "deleted":
            return [tenant_record_id(change.id)]
        if kind == S3TENANT.name:
            return [change.id]
        return []

    async def all_keys(self) -> list[str]:
        keys = [GATEWAY_KEY, SYNC_KEY]
        if not self._leading:
            return keys
        keys += [r.id for r in await list_all(self.store, ACCESSKEY.name)]
        keys += [r.id for r in await list_all(self.store, BUCKET.name)]
        keys += [r.id for r in await list_all(self.store, S3TENANT.name)]
        return keys

    async def reconcile(self, key: str) -> Result:
        if key == GATEWAY_KEY:
            return await self._reconcile_gateway()
        if not self._leading or self._admin is None:
            return Result()  # queued again once this node leads and its gateway serves
        if key == SYNC_KEY:
            return await self._sync()
        if key == KEYS_KEY:
            for record in await list_all(self.store, ACCESSKEY.name):
                self._enqueue(record.id)
            return Result()
        if key.startswith(ACCESSKEY.prefix):
            return await self._reconcile_key(key)
        if key.startswith(f"{BUCKET.prefix}-"):
            return await self._reconcile_bucket(key)
        if key.startswith(f"{S3TENANT.prefix}-"):
            return await self._reconcile_tenant(key)
        return Result()

    # -- the gateway (every node) ------------------------------------------------------------------------------------
    async def _address(self, spec: CephSpec) -> str:
        mons = {n: _ip(a) for n, a in spec.mons.items()}
        if self.node in mons:
            return mons[self.node]
        record = await self.store.get_by_name(NODE.name, "", self.node)
        return _ip(NODE.load(record).spec.address) if record is not None else "127.0.0.1"

    async def _reconcile_gateway(self) -> Result:
        if not self.config.objects.enabled:
            return Result()
        record = await self.store.get_by_name(CEPH.name, "", CEPH_NAME)
        if record is None:
            return Result()
        ceph = CEPH.load(record)
        if not ceph.spec.keys or (ceph.status.state != "ready" and self._rgw is None):
            return Result(requeue_after=RETRY)  # the cluster is not usable yet: pools and RGW would hang
        address = await self._address(ceph.spec)
        mons = {n: _ip(a) for n, a in ceph.spec.mons.items()}
        signature = (ceph.spec.fsid, tuple(sorted(mons.items())), address)
        if self._rgw is None or self._signature != signature:
            engine = self.engine_factory(
                root=self.config.data_path / "ceph", fsid=ceph.spec.fsid, node=self.node, address=address,
                mon_hosts=mons,
            )  # fmt: skip
            self._rgw = self.rgw_factory(engine, self._settings(address))
            self._signature = signature
        rgw = self._rgw
        if not _installed(rgw):
            return Result(requeue_after=RETRY)  # the storage reconciler has not installed the keys here yet
        try:
            if not self._pools_done:
                await rgw.ensure_pools()
                self._pools_done = True
            await rgw.ensure_key()
            if await rgw.ensure_running():
                log.warning("started the S3 gateway", extra={"url": rgw.settings.url})
        except Exception as exc:  # RgwError, CephError: said in the log, tried again
            log.error("the S3 gateway does not run", extra={"error": str(exc)})
            return Result(requeue_after=SUPERVISE)
        leading = await self._leads(ceph.spec)
        if leading and self._admin is None:
            access, secret = await rgw.ensure_admin_user()
            self._admin = RgwClient(rgw.settings.url, access, secret, ssl_ctx=ssl_context(str(self.pki / "ca.crt")))
        if leading and not self._leading:
            self._leading = True
            self._spawn(self._enqueue_all())
        self._leading = leading
        return Result(requeue_after=SUPERVISE)

    def _settings(self, address: str) -> Any:
        from agent.storage.rgw import RgwSettings, gateway_cert

        cfg = self.config.objects
        dns_name = f"s3.{cfg.domain}" if cfg.domain else ""
        cert, key = gateway_cert(self.pki, self.node, dns_name)
        return RgwSettings(node=self.node, address=address, port=cfg.port, cert=cert, key=key, dns_name=dns_name)

    async def _leads(self, spec: CephSpec) -> bool:
        for candidate in [spec.bootstrap_node, *sorted(spec.mons)]:
            if candidate == self.node:
                return True
            record = await self.store.get_by_name(NODE.name, "", candidate)
            if record is None:
                if not await self.store.list(NODE.name, project="", limit=1):
                    return False  # a single node without node records: the bootstrap node is up
                continue
            if NODE.load(record).status.state != "offline":
                return False
        return False

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _enqueue_all(self) -> None:
        with contextlib.suppress(Exception):
            for key in await self.all_keys():
                self._enqueue(key)

    # -- tenants -----------------------------------------------------------------------------------------------------
    async def _tenant(self, project: str) -> S3TenantSpec | None:
        """The project's tenant, made (record first, then RGW) when missing; None when the project is gone."""
        pid = await project_id_of(self.store, project)
        if pid is None:
            return None
        record = await ensure_tenant_record(self.store, self.keystore, project, pid)
        if record is None:
            return None
        spec = S3TENANT.load(record).spec
        await self._ensure_user(spec)
        return spec

    async def _ensure_user(self, t: S3TenantSpec) -> dict[str, Any]:
        assert self._admin is not None
        try:
            info = await self._admin.admin("GET", "user", {"uid": t.uid})
        except S3Error as exc:
            if exc.status != 404:
                raise
            secret = self.keystore.decrypt(t.secret, t.access_key.encode()).decode()
            info = await self._admin.admin(
                "PUT", "user",
                {"uid": t.uid, "display-name": f"minicloud project {t.project or t.project_id}", "key-type": "s3",
                 "access-key": t.access_key, "secret-key": secret, "max-buckets": "1000"},
            )  # fmt: skip
            await self._project_quota(t)
            info = await self._admin.admin("GET", "user", {"uid": t.uid})
        return await self._ensure_readonly_subuser(t, dict(info or {}))

    async def _ensure_readonly_subuser(self, t: S3TenantSpec, info: dict[str, Any]) -> dict[str, Any]:
        """The tenant's read-only subuser, with ``read`` access, checked on every call and not only when the user is
        made: a key added for a subuser RGW does not have yet makes one with no permissions, so a ``viewer``'s key
        added between another task's user and subuser calls would be refused for good (seen once in CI)."""
        assert self._admin is not None
        sub = f"{t.uid}:{READONLY_SUBUSER}"
        perms = {u.get("id"): u.get("permissions") for u in info.get("subusers") or []}
        if perms.get(sub) == "read":
            return info
        await self._admin.admin(
            "POST" if sub in perms else "PUT", "user",
            {"uid": t.uid, "subuser": f"{PROJECT_USER}:{READONLY_SUBUSER}", "access": "read",
             "generate-secret": "false", "key-type": "s3"},
        )  # fmt: skip
        return dict(await self._admin.admin("GET", "user", {"uid": t.uid}) or {})

    async def _project_quota(self, t: S3TenantSpec) -> None:
        """The tenant user's quota: the project's own (``s3 quota set``) or the configuration's."""
        assert self._admin is not None
        cfg = self.config.objects
        qb, qo, _ = quota_in_force(t, cfg.quota_bytes, cfg.quota_objects)
        enabled = bool(qb or qo)
        await self._admin.admin(
            "PUT", "user",
            [("quota", ""), ("uid", t.uid), ("quota-type", "user"), ("enabled", "true" if enabled else "false"),
             ("max-objects", str(qo or -1)), ("max-size", str(qb or -1))],
        )  # fmt: skip

    async def _reconcile_tenant(self, rid: str) -> Result:
        record = await self.store.get(S3TENANT.name, rid)
        if record is None:
            return Result()
        t = S3TENANT.load(record).spec
        assert self._admin is not None
        if t.project_id == DEFAULT_PROJECT_ID or await self.store.get(PROJECT.name, t.project_id) is not None:
            await self._ensure_user(t)
            await self._project_quota(t)  # a quota set or changed
            return Result()
        with contextlib.suppress(S3Error):
            await self._admin.admin("DELETE", "user", {"uid": t.uid, "purge-data": "true"}, ok=(404,))
        with contextlib.suppress(TxnFailed):
            await self.store.commit(Txn([Delete(kind=S3TENANT.name, id=rid, expect_revision=record.revision)]))
        log.warning("removed the S3 tenant of a deleted project", extra={"tenant": t.tenant})
        return Result()

    # -- access keys -------------------------------------------------------------------------------------------------
    async def _mode(self, record: Record) -> tuple[str | None, float | None]:
        """The key's wanted identity, and when to look again (its expiry)."""
        key = ACCESSKEY.load(record)
        project = record.project
        spec = key.spec
        expires_at = getattr(spec, "expires_at", None) or record.spec.get("expires_at")
        disabled = bool(getattr(spec, "disabled", False) or record.spec.get("disabled"))
        may_write = await self._may(spec.principal, WRITE_ACTION, project)
        may_read = may_write or await self._may(spec.principal, READ_ACTION, project)
        mode = wanted_mode(may_write=may_write, may_read=may_read, disabled=disabled, expired=_expired(expires_at))
        again = None
        if expires_at and mode is not None:
            with contextlib.suppress(ValueError):
                again = max(0.5, ids.parse_time(str(expires_at)).timestamp() - time.time())
        return mode, again

    async def _may(self, principal: str, action: str, project: str) -> bool:
        """Whether the key's principal may ``action`` in ``project`` *through a binding on that project*: outside the
        default project, a cluster-wide role (``admin``) gives no S3 access by itself — a project's buckets are
        opened to an administrator's key only by an explicit role binding on the project (the grant)."""
        if not (await self.directory.decide(principal, action, project)).allowed:
            return False
        load = getattr(self.directory, "load", None)
        if project == DEFAULT_PROJECT or load is None:
            return True
        bindings, roles = await load()
        return project_granted(principal, action, project, bindings, roles)

    async def _remove_key(self, access_key: str) -> None:
        assert self._admin is not None
        try:
            await self._admin.admin("DELETE", "user", [("key", ""), ("access-key", access_key)], ok=(404,))
        except S3Error as exc:
            if exc.status not in (400, 403, 404):
                raise

    async def _reconcile_key(self, key_id: str) -> Result:
        record = await self.store.get(ACCESSKEY.name, key_id)
        if record is None:
            await self._remove_key(key_id)
            return Result()
        mode, again = await self._mode(record)
        tenant = await self._tenant(record.project) if mode is not None else None
        if mode is None or tenant is None:
            await self._remove_key(key_id)
            return Result()
        assert self._admin is not None
        info = await self._admin.admin("GET", "user", {"uid": tenant.uid})
        owner = {k["access_key"]: k["user"] for k in (info or {}).get("keys", [])}.get(key_id)
        want_owner = tenant.uid if mode == "rw" else f"{tenant.uid}:{READONLY_SUBUSER}"
        if owner != want_owner:
            if owner is not None:
                await self._remove_key(key_id)
            from minicloud.iam.accesskeys import secret_of

            params = [("key", ""), ("uid", tenant.uid), ("key-type", "s3"), ("access-key", key_id),
                      ("secret-key", secret_of(self.keystore, record))]  # fmt: skip
            if mode == "ro":
                params.append(("subuser", f"{PROJECT_USER}:{READONLY_SUBUSER}"))
            await self._admin.admin("PUT", "user", params)
            log.info("access key in the object store", extra={"key": key_id, "mode": mode, "tenant": tenant.tenant})
        return Result(requeue_after=again) if again is not None else Result()

    # -- buckets -----------------------------------------------------------------------------------------------------
    async def _service_client(self, t: S3TenantSpec) -> RgwClient:
        assert self._admin is not None
        secret = self.keystore.decrypt(t.secret, t.access_key.encode()).decode()
        return RgwClient(self._admin.endpoint, t.access_key, secret, ssl_ctx=ssl_context(str(self.pki / "ca.crt")))

    async def _set_bucket_status(
        self, bucket_id: str, compute: Callable[[Any], dict[str, Any]] | None = None, **fields: Any
    ) -> None:
        """Set ``fields`` (and what ``compute`` derives from the status read at write time) in the bucket's status."""

        def merge(record: Record) -> Record | None:
            current = BUCKET.load(record)
            new = msgspec.structs.replace(current.status, **fields, **(compute(current.status) if compute else {}))
            if new == current.status:
                return None
            return msgspec.structs.replace(record, status={**record.status, **msgspec.to_builtins(new)})

        await update_record(self.store, BUCKET.name, bucket_id, merge)

    async def _set_bucket_spec(self, bucket_id: str, **fields: Any) -> None:
        def merge(record: Record) -> Record | None:
            current = BUCKET.load(record)
            new = msgspec.structs.replace(current.spec, **fields)
            if new == current.spec:
                return None
            return msgspec.structs.replace(record, spec={**record.spec, **msgspec.to_builtins(new)})

        await update_record(self.store, BUCKET.name, bucket_id, merge)

    async def _reconcile_bucket(self, bucket_id: str) -> Result:
        record = await self.store.get(BUCKET.name, bucket_id)
        if record is None:
            return Result()
        bucket = BUCKET.load(record)
        tenant = await self._tenant(record.project)
        if tenant is None:
            return Result()
        s3 = await self._service_client(tenant)
        try:
            if bucket.spec.deleted:
                # the service deleting it asks RGW itself; step in only when it did not finish (no gateway answered)
                waited = time.time() - ids.parse_time(bucket.updated_at).timestamp()
                if waited < DELETE_GRACE:
                    return Result(requeue_after=DELETE_GRACE - waited + 0.1)
                return await self._delete_bucket(bucket, s3)
            await self._converge_bucket(bucket, tenant, s3)
        except S3Error as exc:
            if exc.status >= 500:
                raise
            log.warning("RGW refused a bucket step", extra={"bucket": bucket.name, "error": str(exc)})
            await self._set_bucket_status(bucket_id, state="error", reason=f"S3 said {exc.code}: {exc.message}")
            return Result(requeue_after=SYNC)
        finally:
            await s3.close()
        return Result()

    async def _delete_bucket(self, bucket: Any, s3: RgwClient) -> Result:
        try:
            await s3.request("DELETE", f"/{bucket.name}", ok=(404,))
        except S3Error as exc:
            if exc.code != "BucketNotEmpty":
                raise
            await self._set_bucket_spec(bucket.id, deleted=False)
            await self._set_bucket_status(bucket.id, reason="not deleted: it is not empty (S3: BucketNotEmpty)")
            return Result()
        with contextlib.suppress(TxnFailed):
            await self.store.commit(Txn([Delete(kind=BUCKET.name, id=bucket.id)]))
        return Result()

    async def _converge_bucket(self, bucket: Any, tenant: S3TenantSpec, s3: RgwClient) -> None:
        assert self._admin is not None
        spec: BucketSpec = bucket.spec
        name = bucket.name
        status, _, _ = await s3.request("HEAD", f"/{name}", ok=(404,))
        if status == 404:
            await s3.request("PUT", f"/{name}")
        versioning = bucket.status.versioning
        if spec.versioning and versioning != "Enabled":
            await s3.request("PUT", f"/{name}", [("versioning", "")], body=_versioning_xml("Enabled"))
            versioning = "Enabled"
        elif not spec.versioning and versioning == "Enabled":
            await s3.request("PUT", f"/{name}", [("versioning", "")], body=_versioning_xml("Suspended"))
            versioning = "Suspended"
        policy_status, _, body = await s3.request("GET", f"/{name}", [("policy", "")], ok=(404,))
        has_public = policy_status == 200 and b"minicloud-public-read" in body
        if spec.public_read and not has_public:
            await s3.request("PUT", f"/{name}", [("policy", "")], body=public_read_policy(tenant.tenant, name).encode())
        elif not spec.public_read and has_public:
            await s3.request("DELETE", f"/{name}", [("policy", "")])
        enabled = bool(spec.quota_bytes or spec.quota_objects)
        await self._admin.admin(
            "PUT", "bucket",
            [("quota", ""), ("uid", tenant.uid), ("bucket", name), ("enabled", "true" if enabled else "false"),
             ("max-objects", str(spec.quota_objects or -1)),
             ("max-size-kb", str(-(-spec.quota_bytes // 1024) if spec.quota_bytes else -1))],
        )  # fmt: skip
        await self._set_bucket_status(bucket.id, state="ready", reason="", versioning=versioning)

    # -- the periodic sync -------------------------------------------------------------------------------------------
    async def _sync(self) -> Result:
        assert self._admin is not None
        keys = {r.id: r for r in await list_all(self.store, ACCESSKEY.name)}
        for record in await list_all(self.store, S3TENANT.name):
            t = S3TENANT.load(record).spec
            try:
                info = await self._ensure_user(t)
                await self._project_quota(t)
                for k in info.get("keys", []):
                    access = str(k.get("access_key", ""))
                    if access.startswith(SERVICE_PREFIX):
                        continue
                    if access not in keys or keys[access].project != t.project:
                        await self._remove_key(access)
                        log.warning("removed an RGW key no access key names", extra={"key": access})
                await self._sync_buckets(t)
            except S3Error as exc:
                log.warning("syncing an S3 tenant failed", extra={"tenant": t.tenant, "error": str(exc)})
        return Result(requeue_after=SYNC)

    async def _sync_buckets(self, t: S3TenantSpec) -> None:
        assert self._admin is not None
        stats = await self._admin.admin("GET", "bucket", {"uid": t.uid, "stats": "true"}) or []
        records = {BUCKET.load(r).name: r for r in await list_all(self.store, BUCKET.name, project=t.project)}
        since = {name: ids.parse_time(r.created_at).timestamp() for name, r in records.items()}
        usage = await self._admin.admin(
            "GET", "usage", {"uid": t.uid, "show-entries": "true", "show-summary": "false"}, ok=(404,)
        )
        usage = usage or {}
        cutoff = usage_cutoff(time.time(), self.config.objects.usage_keep_days)
        now = ids.now()
        for entry in stats:
            name = str(entry.get("bucket", ""))
            main = (entry.get("usage") or {}).get("rgw.main") or {}
            size, objects = int(main.get("size", 0)), int(main.get("num_objects", 0))
            record = records.get(name)
            if record is None:
                obj = BUCKET.new(project=t.project, name=name, spec=BucketSpec(adopted=True))
                obj = obj.replace(status=msgspec.structs.replace(obj.status, state="ready", size_bytes=size,
                                                                 objects=objects, observed_at=now))  # fmt: skip
                with contextlib.suppress(TxnFailed):
                    await self.store.commit(Txn([Create(BUCKET.dump(obj))]))
                continue

            def meter(status: Any, name: str = name, size: int = size, objects: int = objects) -> dict[str, Any]:
                return {"size_bytes": size, "objects": objects, "observed_at": now,
                        **fold(usage, name, since[name], status, cutoff)}  # fmt: skip

            await self._set_bucket_status(record.id, meter)
        # every bucket RGW listed has its bins before the cutoff folded now (a failed write raised above); the others
        # have none to count (being made, or adopted just now from this hour on)
        if oldest_bin(usage) < cutoff:
            await self._admin.admin("DELETE", "usage", {"uid": t.uid, "end": str(cutoff - 1)}, ok=(404,))
            log.info("trimmed the S3 usage log", extra={"tenant": t.tenant, "before": cutoff})


def usage_cutoff(now: float, keep_days: int) -> int:
    """The start of the hour ``keep_days`` before ``now``: the usage bins that started before it are folded and
    trimmed."""
    return int(now - keep_days * 86400) // 3600 * 3600


def oldest_bin(usage: dict[str, Any]) -> float:
    """The start (epoch) of the oldest bin in a usage answer (infinity when it has none)."""
    epochs = [int(e.get("epoch", 0) or 0) for u in usage.get("entries") or [] for e in u.get("buckets") or []]
    return min(epochs, default=float("inf"))


def fold(usage: dict[str, Any], name: str, since: float, status: Any, cutoff: int) -> dict[str, Any]:
    """Pure: bucket ``name``'s metering fields from a usage answer and its status: what was folded before, plus the
    bins from ``status.folded_before`` on; bins that started before ``cutoff`` are folded now (moved into
    ``folded``, ``folded_before`` = ``cutoff``) so that trimming them from RGW changes no total."""
    before = status.folded_before
    live = metering(usage, {name: since}, {name: before}).get(name, (0, 0, 0))
    folded = tuple(status.folded)
    if cutoff > before:
        old = metering(usage, {name: since}, {name: before}, until=cutoff).get(name, (0, 0, 0))
        folded, before = tuple(a + b for a, b in zip(folded, old, strict=True)), cutoff
    total = [a + b for a, b in zip(status.folded, live, strict=True)]
    return {"requests": total[0], "bytes_out": total[1], "bytes_in": total[2], "folded": folded,
            "folded_before": before}  # fmt: skip


def metering(
    usage: dict[str, Any],
    since: dict[str, float],
    after: dict[str, int] | None = None,
    *,
    until: float = float("inf"),
) -> dict[str, tuple[int, int, int]]:
    """Per bucket, ``(requests, bytes out, bytes in)`` from an ``/admin/usage?show-entries=true`` answer: RGW's
    usage log (hourly bins per bucket and category, logged against the bucket's owner — anonymous GETs of a public
    bucket count too), summed over the bins from the hour the bucket was made (``since``: its creation time; a
    bucket made again under an old name does not inherit the old one's figures). Buckets not in ``since`` and
    requests naming no bucket (ListBuckets) are left out. Bins that started before ``after[bucket]`` (already
    folded into its status) or at/after ``until`` are left out too."""
    out: dict[str, list[int]] = {}
    after = after or {}
    for user in usage.get("entries") or []:
        for entry in user.get("buckets") or []:
            name = str(entry.get("bucket", ""))
            if name not in since:
                continue
            epoch = int(entry.get("epoch", 0) or 0)
            if epoch and epoch + 3600 <= since[name]:
                continue  # a bin that closed before the bucket was made
            if epoch < after.get(name, 0) or epoch >= until:
                continue
            acc = out.setdefault(name, [0, 0, 0])
            for cat in entry.get("categories") or []:
                acc[0] += int(cat.get("ops", 0) or 0)
                acc[1] += int(cat.get("bytes_sent", 0) or 0)
                acc[2] += int(cat.get("bytes_received", 0) or 0)
    return {k: (v[0], v[1], v[2]) for k, v in out.items()}


def _versioning_xml(status: str) -> bytes:
    return f'<VersioningConfiguration xmlns="{_XMLNS}"><Status>{status}</Status></VersioningConfiguration>'.encode()


def _installed(rgw: Any) -> bool:
    engine = rgw.engine
    return bool(os.path.exists(engine.conf_path) and os.path.exists(engine.admin_keyring))


def _real_rgw(engine: Any, settings: Any) -> Any:
    from agent.storage.rgw import Rgw

    return Rgw(engine, settings)


__all__ = [
    "GATEWAY_KEY",
    "KEYS_KEY",
    "SYNC_KEY",
    "ObjectsReconciler",
    "metering",
    "project_granted",
    "public_read_policy",
    "wanted_mode",
]
