"""Volume backups on the node: an S3 client that streams (:class:`S3Bucket`), and the backups reconciler.

The reconciler (:class:`BackupReconciler`, on :mod:`agent.reconcile`) works on

- ``volumebackup`` records whose ``spec.node`` is this node: make the backup (RBD: snapshot ``bk-<id>`` on the
  volume, ``rbd export-diff [--from-snap bk-<parent>] pool/vol@bk-<id> -`` piped into an S3 multipart upload, one
  part of :data:`~minicloud.storage.backups.PART_BYTES` spooled to a file at a time with its sha256; ``local``:
  ``qemu-img convert -O qcow2`` to a spool file — refused while a running guest holds the file — uploaded the same
  way), then the manifest; the parent's snapshot is removed from the volume once the child is stored (only the chain
  head's stays). Progress (``done_bytes``) is written after each part. ``spec.deleted``: the objects go, then the
  volume's snapshot of it, then the record.
- ``volume`` records restored from a backup (``source.type = backup``) whose node is this one: read the chain's
  manifests, create ``rst-<vol id>`` (a name the storage sweep never touches; the sweep below does), ``rbd import-diff -`` each link's data
  onto it while checking every part's sha256, drop the imported snapshots and rename it to the volume's id; the
  storage reconciler (which waits for the image) then marks the volume available. A qcow2 copy is downloaded to a
  spool file and imported with the pool's driver.
- :data:`SWEEP_KEY` (on each resync, at most every :data:`SWEEP_EVERY` seconds): ``rst-*`` images in this node's
  ceph pools whose volume is gone or being deleted (a restore interrupted for good) are removed, snapshots first.

Outbound requests to a ``backuptarget`` (a caller-chosen endpoint) go through the allow-list (``compute.image_url_allow``,
:func:`~minicloud.compute.image_download.guarded_connector`: every resolved address and the exact address each
socket connects to are checked): the image URL rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec
from yarl import URL

from agent.reconcile import Result, update_record
from agent.storage.driver import StorageError
from minicloud import errors, ids
from minicloud.config import Config
from minicloud.objects import sigv4
from minicloud.objects.rgwclient import S3Error, _error_of
from minicloud.state import Change, Delete, Store, Txn, TxnFailed, list_all
from minicloud.storage import backups as bk
from minicloud.storage.backup_kinds import VOLUME_BACKUP
from minicloud.storage.kinds import VOLUME

log = logging.getLogger("minicloud.storage.backup")

RETRY = 5.0
ERROR_RETRY = 60.0
CHUNK = 1 << 20
RESTORE_PREFIX = "rst-"
#: The reconciler key of the sweep of interrupted restores, and the least seconds between two sweeps.
SWEEP_KEY = "backups:sweep"
SWEEP_EVERY = 600.0
FEATURES = "layering,exclusive-lock,object-map,fast-diff,deep-flatten"


# -- S3 ----------------------------------------------------------------------------------------------------------------
def _ssl_for(ep: bk.Endpoint) -> ssl.SSLContext:
    if ep.ca_pem:
        ctx = ssl.create_default_context(cadata=ep.ca_pem)
        ctx.check_hostname = False  # a pinned private CA is the trust anchor (as for the cluster's own gateway)
        return ctx
    if ep.ca_file:
        ctx = ssl.create_default_context(cafile=ep.ca_file)
        ctx.check_hostname = False
        return ctx
    return ssl.create_default_context()


async def _file_slice(path: Path, offset: int, size: int) -> AsyncIterator[bytes]:
    with path.open("rb") as f:
        f.seek(offset)
        left = size
        while left > 0:
            chunk = await asyncio.to_thread(f.read, min(CHUNK, left))
            if not chunk:
                raise OSError(f"{path.name} ended {left} bytes early")
            left -= len(chunk)
            yield chunk


class S3Bucket:
    """Signed, streamed requests to one bucket of one endpoint (path style). ``policy``: the allow-list for an
    external endpoint (connections are resolved through it), None for this cluster's gateway."""

    def __init__(self, ep: bk.Endpoint, bucket: str, *, policy: Any = None, timeout: float = 600.0) -> None:
        self.ep, self.bucket = ep, bucket
        self._ssl = _ssl_for(ep) if ep.url.startswith("https") else None
        self._policy = policy
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> S3Bucket:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None:
            tls = self._ssl if self._ssl is not None else False
            if self._policy is not None:  # another endpoint: every address checked, when resolved and at connect
                from minicloud.compute.image_download import guarded_connector

                connector, _ = guarded_connector(self._policy, URL(self.ep.url).host or "", ssl=tls, limit=4)
            else:
                connector = aiohttp.TCPConnector(ssl=tls)
            self._session = aiohttp.ClientSession(timeout=self._timeout, connector=connector, trust_env=False)
        return self._session

    def _url(self, key: str, params: Iterable[tuple[str, str]]) -> str:
        query = sigv4.canonical_query(list(params))
        path = quote(f"/{self.bucket}/{key}" if key else f"/{self.bucket}", safe="/-_.~")
        return f"{self.ep.url.rstrip('/')}{path}" + (f"?{query}" if query else "")

    def _sign(self, method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None) -> dict:
        return sigv4.sign(
            method, url, access_key=self.ep.access_key, secret_key=self.ep.secret_key, region=self.ep.region,
            headers=headers, body=body or b"", unsigned_payload=body is None,
        )  # fmt: skip

    def _check_ip(self) -> None:
        if self._policy is not None:
            bk.check_endpoint_url(self.ep.url, self._policy)

    async def request(
        self,
        method: str,
        key: str = "",
        params: Iterable[tuple[str, str]] = (),
        *,
        body: bytes = b"",
        ok: Iterable[int] = (),
    ) -> tuple[int, dict[str, str], bytes]:
        self._check_ip()
        url = self._url(key, params)
        headers = self._sign(method, url, body=body)
        async with self._sess().request(
            method, URL(url, encoded=True), data=body if body or method in ("PUT", "POST") else None, headers=headers
        ) as resp:  # fmt: skip
            data = await resp.read()
            out = {k.lower(): v for k, v in resp.headers.items()}
            if resp.status >= 300 and resp.status not in set(ok):
                raise _error_of(resp.status, data, f"{method} {self.bucket}/{key}")
            return resp.status, out, data

    async def put_stream(
        self, key: str, chunks: AsyncIterator[bytes], size: int, params: Iterable[tuple[str, str]] = ()
    ) -> str:
        """PUT ``size`` bytes from ``chunks`` (unsigned payload over TLS, with its length); the ETag."""
        self._check_ip()
        url = self._url(key, params)
        headers = self._sign("PUT", url) | {"Content-Length": str(size)}
        async with self._sess().put(URL(url, encoded=True), data=chunks, headers=headers) as resp:
            data = await resp.read()
            if resp.status >= 300:
                raise _error_of(resp.status, data, f"PUT {self.bucket}/{key}")
            return resp.headers.get("ETag", "")

    @contextlib.asynccontextmanager
    async def get(self, key: str) -> AsyncIterator[aiohttp.StreamReader]:
        """The object's body as a stream."""
        self._check_ip()
        url = self._url(key, ())
        async with self._sess().get(URL(url, encoded=True), headers=self._sign("GET", url, body=b"")) as resp:
            if resp.status >= 300:
                raise _error_of(resp.status, await resp.read(), f"GET {self.bucket}/{key}")
            yield resp.content

    async def start_multipart(self, key: str) -> str:
        _, _, data = await self.request("POST", key, [("uploads", "")])
        root = ET.fromstring(data)
        upload = next((el.text for el in root.iter() if el.tag.endswith("UploadId")), None)
        if not upload:
            raise S3Error(500, "NoUploadId", "the endpoint answered no UploadId", f"POST {key}?uploads")
        return upload

    async def complete_multipart(self, key: str, upload_id: str, etags: list[str]) -> None:
        parts = "".join(f"<Part><PartNumber>{n}</PartNumber><ETag>{e}</ETag></Part>" for n, e in enumerate(etags, 1))
        body = f"<CompleteMultipartUpload>{parts}</CompleteMultipartUpload>".encode()
        _, _, data = await self.request("POST", key, [("uploadId", upload_id)], body=body)
        if b"<Error>" in data:  # S3 may answer 200 with an error document
            raise _error_of(500, data, f"completing {key}")

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        await self.request("DELETE", key, [("uploadId", upload_id)], ok=(404,))

    async def delete(self, key: str) -> None:
        await self.request("DELETE", key, ok=(404,))


# -- streaming into and out of the bucket -----------------------------------------------------------------------------
Progress = Callable[[int, str], Any]


async def upload_parts(
    s3: S3Bucket,
    key: str,
    upload_id: str,
    read: Callable[[int], Any],
    spool: Path,
    *,
    part_bytes: int,
    progress: Progress,
) -> list[bk.PartInfo]:
    """Read ``read(n)`` (an async reader: ``b""`` at the end) in parts of ``part_bytes``: each is written to
    ``spool`` (with its sha256), then uploaded as the next part of ``upload_id``; the upload is completed."""
    parts: list[bk.PartInfo] = []
    etags: list[str] = []
    done = 0
    while True:
        digest = hashlib.sha256()
        size = 0
        with spool.open("wb") as f:
            while size < part_bytes:
                chunk = await read(min(CHUNK, part_bytes - size))
                if not chunk:
                    break
                digest.update(chunk)
                await asyncio.to_thread(f.write, chunk)
                size += len(chunk)
        if size == 0 and parts:
            break
        n = len(parts) + 1
        etags.append(await s3.put_stream(key, _file_slice(spool, 0, size), size,
                                          [("partNumber", str(n)), ("uploadId", upload_id)]))  # fmt: skip
        parts.append(bk.PartInfo(number=n, size=size, sha256=digest.hexdigest()))
        done += size
        await progress(done, f"part {n} stored")
        if size < part_bytes:
            break
    await asyncio.to_thread(spool.unlink, missing_ok=True)
    await s3.complete_multipart(key, upload_id, etags)
    return parts


async def stream_parts(s3: S3Bucket, key: str, parts: list[bk.PartInfo], write: Callable[[bytes], Any]) -> int:
    """GET ``key`` and hand its bytes to ``write`` part by part, checking each part's sha256 (StorageError on a
    mismatch or a short object: the caller discards what was written)."""
    total = 0
    async with s3.get(key) as body:
        for part in parts:
            digest = hashlib.sha256()
            left = part.size
            while left > 0:
                chunk = await body.read(min(CHUNK, left))
                if not chunk:
                    raise StorageError(f"{key} ends inside part {part.number}: the backup is damaged")
                digest.update(chunk)
                await write(chunk)
                left -= len(chunk)
                total += len(chunk)
            if digest.hexdigest() != part.sha256:
                raise StorageError(f"part {part.number} of {key} does not match its sha256: the backup is damaged")
        if await body.read(1):
            raise StorageError(f"{key} is longer than its manifest says: the backup is damaged")
    return total


async def _read_manifest(s3: S3Bucket, prefix: str) -> bk.Manifest:
    try:
        _, _, data = await s3.request("GET", bk.manifest_key(prefix))
    except S3Error as exc:
        if exc.status == 404:
            raise StorageError(f"{bk.manifest_key(prefix)} is missing from bucket {s3.bucket}") from None
        raise
    try:
        return bk.decode_manifest(data)
    except ValueError as exc:
        raise StorageError(f"{bk.manifest_key(prefix)}: {exc}") from None


# -- the reconciler ---------------------------------------------------------------------------------------------------
class BackupReconciler:
    """See the module docstring."""

    name = "backups"
    kinds = frozenset({VOLUME_BACKUP.name, VOLUME.name})

    def __init__(
        self, *, store: Store, config: Config, storage: Any, keystore: Any, part_bytes: int = bk.PART_BYTES
    ) -> None:
        self.store = store
        self.config = config
        self.node = config.node_name
        self.storage = storage
        self.keystore = keystore
        self.part_bytes = part_bytes
        self.spool = config.data_path / "storage" / "backup-spool"
        self._policy: Any = None
        self._swept_at: float | None = None

    async def start(self, enqueue: Callable[[str], None]) -> None:
        self._enqueue = enqueue

    async def close(self) -> None:
        return None

    def keys_for(self, change: Change) -> Iterable[str]:
        if change.type == "deleted":
            return []
        spec = change.record.spec if isinstance(change.record.spec, dict) else {}
        if spec.get("node") != self.node:
            return []
        if change.kind == VOLUME.name:
            src = spec.get("source") or {}
            return [change.id] if src.get("type") == "backup" else []
        return [change.id]

    async def all_keys(self) -> list[str]:
        keys = [SWEEP_KEY, *(r.id for r in await list_all(self.store, VOLUME_BACKUP.name, where={"node": self.node}))]
        for r in await list_all(self.store, VOLUME.name, where={"node": self.node}):
            if (r.spec.get("source") or {}).get("type") == "backup":
                keys.append(r.id)
        return keys

    async def reconcile(self, key: str) -> Result:
        if key == SWEEP_KEY:
            now = time.monotonic()
            if self._swept_at is None or now - self._swept_at >= SWEEP_EVERY:
                self._swept_at = now
                await self.sweep_restores()
            return Result()
        if key.startswith(f"{VOLUME_BACKUP.prefix}-"):
            record = await self.store.get(VOLUME_BACKUP.name, key)
            if record is None:
                return Result()
            obj = VOLUME_BACKUP.load(record)
            if obj.spec.node != self.node:
                return Result()
            if obj.spec.deleted:
                return await self._guard(VOLUME_BACKUP, key, self._delete(obj))
            if obj.status.state in ("available", "error"):
                return Result()
            return await self._guard(VOLUME_BACKUP, key, self._backup(obj))
        record = await self.store.get(VOLUME.name, key)
        if record is None:
            return Result()
        vol = VOLUME.load(record)
        if vol.spec.node != self.node or vol.spec.source.type != "backup" or vol.spec.deleted:
            return Result()
        return await self._guard(VOLUME, key, self._restore(vol))

    async def _guard(self, kind: Any, key: str, step: Any) -> Result:
        try:
            return await step
        except (asyncio.CancelledError, TxnFailed):
            raise
        except (StorageError, S3Error, OSError, TimeoutError, aiohttp.ClientError, errors.MinicloudError) as exc:
            reason = str(exc) or type(exc).__name__
            log.warning("backup step failed", extra={"kind": kind.name, "id": key, "error": reason})
            await self._set(kind, key, state="error", reason=reason)
            return Result(requeue_after=ERROR_RETRY) if kind is VOLUME else Result()

    # -- plumbing ------------------------------------------------------------------------------------------------
    def policy(self) -> Any:
        if self._policy is None:
            from minicloud.compute.url_policy import UrlPolicy

            self._policy = UrlPolicy.from_config(self.config.compute.image_url_allow)
        return self._policy

    async def _bucket(self, project: str, target: str, bucket: str) -> S3Bucket:
        ep = await bk.resolve_endpoint(
            self.store, self.keystore, project=project, target=target, node=self.node,
            port=self.config.objects.port, ca_file=self.config.data_path / "pki" / "ca.crt",
        )  # fmt: skip
        return S3Bucket(ep, bucket, policy=self.policy() if ep.external else None)

    async def _set(self, kind: Any, id_: str, **fields: Any) -> None:
        def merge(record: Any) -> Any:
            current = kind.load(record)
            new = msgspec.structs.replace(current.status, **fields)
            if new == current.status:
                return None
            return msgspec.structs.replace(record, status={**record.status, **msgspec.to_builtins(new)})

        await update_record(self.store, kind.name, id_, merge)

    def _rbd_argv(self, driver: Any, *args: str) -> list[str]:
        return ["rbd", "--conf", str(driver.conf), "--id", driver.user, "--keyring", str(driver.keyring), *args]

    async def _rbd(self, driver: Any, *args: str, what: str) -> str:
        from agent.storage.driver import run_tool

        result = await run_tool(self._rbd_argv(driver, *args), timeout=600, what=what)
        if result.returncode != 0:
            raise StorageError(f"{what}: {result.last_line()}")
        return result.stdout

    # -- backup ----------------------------------------------------------------------------------------------------
    async def _backup(self, obj: Any) -> Result:
        spec, status = obj.spec, obj.status
        driver = self.storage.driver(spec.pool)
        if driver is None:
            return Result(requeue_after=RETRY)
        s3 = await self._bucket(obj.project, spec.target, spec.bucket)
        key = bk.data_key(spec.prefix)
        async with s3:
            if status.upload_id:  # a crash left it half-made: start again
                with contextlib.suppress(S3Error, aiohttp.ClientError):
                    await s3.abort_multipart(key, status.upload_id)
            started = ids.now()
            t0 = time.monotonic()
            upload_id = await s3.start_multipart(key)
            await self._set(VOLUME_BACKUP, obj.id, state="uploading", reason="", started_at=started, done_bytes=0,
                            upload_id=upload_id)  # fmt: skip
            self.spool.mkdir(parents=True, exist_ok=True, mode=0o700)

            async def progress(done: int, _: str) -> None:
                await self._set(VOLUME_BACKUP, obj.id, done_bytes=done)

            snap = bk.snap_name(obj.id)
            from_snap = bk.snap_name(spec.parent) if spec.parent else ""
            if driver.name == "ceph":
                size, fmt, parts = await self._export_rbd(obj, driver, s3, key, upload_id, snap, from_snap, progress)
            else:
                size, fmt, parts = await self._export_local(obj, driver, s3, key, upload_id, progress)
            stored = sum(p.size for p in parts)
            manifest = bk.Manifest(
                format=fmt, backup=obj.id, name=obj.name, project=obj.project, volume=spec.volume,
                volume_name=spec.volume_name, size_bytes=size, parent=spec.parent, chain=list(spec.chain),
                snap=snap if fmt == "rbd-diff" else "", from_snap=from_snap, object=key, parts=parts,
                stored_bytes=stored, created_at=obj.created_at, finished_at=ids.now(),
            )  # fmt: skip
            body = bk.encode_manifest(manifest)
            await s3.request("PUT", bk.manifest_key(spec.prefix), body=body)
        await self._set(
            VOLUME_BACKUP, obj.id, state="available", reason="", size_bytes=size, stored_bytes=stored,
            parts=len(parts), done_bytes=stored, manifest_sha256=hashlib.sha256(body).hexdigest(),
            finished_at=manifest.finished_at, seconds=round(time.monotonic() - t0, 3), upload_id="",
        )  # fmt: skip
        if driver.name == "ceph" and spec.parent:
            await self._drop_parent_snap(obj, driver)
        return Result()

    async def _export_rbd(
        self, obj: Any, driver: Any, s3: S3Bucket, key: str, upload_id: str, snap: str, from_snap: str, progress: Any
    ) -> tuple[int, str, list[bk.PartInfo]]:
        vol = obj.spec.volume
        await driver.snapshot(vol, snap)
        if from_snap and from_snap not in await driver.snapshots(vol):
            raise StorageError(
                f"the volume no longer has the snapshot of backup {obj.spec.parent} this one builds on; make a full "
                "backup instead"
            )
        size = int(await driver.size(vol) or 0)
        args = ["export-diff", "--no-progress", *(["--from-snap", from_snap] if from_snap else [])]
        argv = self._rbd_argv(driver, *args, f"{driver.pool}/{vol}@{snap}", "-")
        errfile = self.spool / f"{obj.id}.err"
        with errfile.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                        stdout=asyncio.subprocess.PIPE, stderr=err)  # fmt: skip
        try:
            assert proc.stdout is not None
            parts = await upload_parts(s3, key, upload_id, proc.stdout.read, self.spool / f"{obj.id}.part",
                                       part_bytes=self.part_bytes, progress=progress)  # fmt: skip
            rc = await proc.wait()
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        reason = errfile.read_text(errors="replace").strip().splitlines()
        errfile.unlink(missing_ok=True)
        if rc != 0:
            await s3.delete(key)
            raise StorageError(f"rbd export-diff of {vol} failed: {reason[-1] if reason else rc}")
        return size, "rbd-diff", parts

    async def _export_local(
        self, obj: Any, driver: Any, s3: S3Bucket, key: str, upload_id: str, progress: Any
    ) -> tuple[int, str, list[bk.PartInfo]]:
        from agent.storage.driver import run_tool

        vol = obj.spec.volume
        src = driver.path(vol)
        copy = self.spool / f"{obj.id}.qcow2"
        copy.unlink(missing_ok=True)
        result = await run_tool(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", str(src), str(copy)],
                                timeout=3600, what=f"copying volume {vol}")  # fmt: skip
        if result.returncode != 0:
            copy.unlink(missing_ok=True)
            if "lock" in result.stderr:
                raise StorageError(f"volume {vol} is open by a running guest: detach it or stop the instance to "
                                   "back up a local volume")  # fmt: skip
            raise StorageError(f"copying volume {vol}: {result.last_line()}")
        size = int(await driver.size(vol) or 0)
        try:
            with copy.open("rb") as f:

                async def read(n: int) -> bytes:
                    return await asyncio.to_thread(f.read, n)

                parts = await upload_parts(s3, key, upload_id, read, self.spool / f"{obj.id}.part",
                                           part_bytes=self.part_bytes, progress=progress)  # fmt: skip
        finally:
            copy.unlink(missing_ok=True)
        return size, "qcow2", parts

    async def _drop_parent_snap(self, obj: Any, driver: Any) -> None:
        """Only the chain head's snapshot stays on the volume: the parent's goes, unless a backup still being made
        builds on it."""
        for r in await list_all(self.store, VOLUME_BACKUP.name, where={"node": self.node}):
            other = VOLUME_BACKUP.load(r)
            if other.id != obj.id and other.spec.parent == obj.spec.parent and other.status.state in (
                "creating", "uploading"
            ):  # fmt: skip
                return
        with contextlib.suppress(StorageError):
            await driver.delete_snapshot(obj.spec.volume, bk.snap_name(obj.spec.parent))

    # -- delete ------------------------------------------------------------------------------------------------------
    async def _delete(self, obj: Any) -> Result:
        spec = obj.spec
        try:
            s3 = await self._bucket(obj.project, spec.target, spec.bucket)
        except errors.NotFound:
            s3 = None  # the target is gone: nothing of ours to remove there
        if s3 is not None:
            async with s3:
                try:
                    await s3.delete(bk.manifest_key(spec.prefix))  # first: without it, it is no backup
                    await s3.delete(bk.data_key(spec.prefix))
                    if obj.status.upload_id:
                        await s3.abort_multipart(bk.data_key(spec.prefix), obj.status.upload_id)
                except S3Error as exc:
                    if exc.code != "NoSuchBucket":
                        raise
        driver = self.storage.driver(spec.pool)
        if driver is not None and driver.name == "ceph":
            with contextlib.suppress(StorageError):
                if await driver.exists(spec.volume):
                    await driver.delete_snapshot(spec.volume, bk.snap_name(obj.id))
        record = await self.store.get(VOLUME_BACKUP.name, obj.id)
        if record is not None:
            with contextlib.suppress(TxnFailed):
                await self.store.commit(
                    Txn([Delete(kind=VOLUME_BACKUP.name, id=obj.id, expect_revision=record.revision)])
                )
        return Result()

    # -- restore ------------------------------------------------------------------------------------------------------
    async def sweep_restores(self) -> list[str]:
        """Remove ``rst-<volume id>`` images whose volume record is gone or marked deleted (the restore of a volume
        still wanted cleans its own leftover when it starts again); the names removed. An image a restore still
        writes has a watcher and is refused by RBD: tried again at the next sweep."""
        removed = []
        for pool_id, driver in self.storage.pools().items():
            if driver.name != "ceph":
                continue
            try:
                names = await driver.list()
            except StorageError as exc:
                log.warning("cannot list a pool for interrupted restores", extra={"pool": pool_id, "error": str(exc)})
                continue
            for name in names:
                if not name.startswith(RESTORE_PREFIX):
                    continue
                record = await self.store.get(VOLUME.name, name.removeprefix(RESTORE_PREFIX))
                if record is not None and not record.spec.get("deleted"):
                    continue
                spec = f"{driver.pool}/{name}"
                try:
                    with contextlib.suppress(StorageError):
                        await self._rbd(driver, "snap", "purge", "--no-progress", spec, what="sweeping a restore")
                    await self._rbd(driver, "rm", "--no-progress", spec, what="sweeping a restore")
                except StorageError as exc:
                    log.warning("cannot remove an interrupted restore", extra={"image": spec, "error": str(exc)})
                    continue
                log.warning("removed an interrupted restore", extra={"image": spec})
                removed.append(name)
        return removed

    async def _restore(self, vol: Any) -> Result:
        driver = self.storage.driver(vol.spec.pool)
        if driver is None:
            return Result(requeue_after=RETRY)
        if await driver.exists(vol.id):
            return Result()  # restored: the storage reconciler makes it available
        record = await self.store.get(VOLUME_BACKUP.name, vol.spec.source.id)
        if record is None:
            raise StorageError(f"backup {vol.spec.source.name or vol.spec.source.id} no longer exists")
        backup = VOLUME_BACKUP.load(record)
        links = []
        for link in backup.spec.chain:
            r = await self.store.get(VOLUME_BACKUP.name, link)
            if r is None:
                raise StorageError(f"backup {link} of the chain no longer exists")
            links.append(VOLUME_BACKUP.load(r))
        s3 = await self._bucket(backup.project, backup.spec.target, backup.spec.bucket)
        async with s3:
            manifests = [await _read_manifest(s3, link.spec.prefix) for link in links]
            for link, m in zip(links, manifests, strict=True):
                if m.backup != link.id or m.chain != list(link.spec.chain):
                    raise StorageError(f"the manifest of backup {link.id} names another backup or chain")
            self.spool.mkdir(parents=True, exist_ok=True, mode=0o700)
            if manifests[-1].format == "qcow2":
                await self._restore_qcow2(vol, driver, s3, manifests[-1])
            elif driver.name != "ceph":
                raise StorageError("a chain of RBD diffs restores into a ceph pool only")
            else:
                await self._restore_rbd(vol, driver, s3, manifests)
        log.info("restored a volume from a backup", extra={"volume": vol.id, "backup": backup.id})
        return Result()

    async def _restore_qcow2(self, vol: Any, driver: Any, s3: S3Bucket, m: bk.Manifest) -> None:
        tmp = self.spool / f"restore-{vol.id}.qcow2"
        try:
            with tmp.open("wb") as f:

                async def write(chunk: bytes) -> None:
                    await asyncio.to_thread(f.write, chunk)

                await stream_parts(s3, m.object, m.parts, write)
            await driver.import_file(tmp, vol.id)
        finally:
            tmp.unlink(missing_ok=True)

    async def _restore_rbd(self, vol: Any, driver: Any, s3: S3Bucket, manifests: list[bk.Manifest]) -> None:
        image = f"{RESTORE_PREFIX}{vol.id}"
        spec = f"{driver.pool}/{image}"
        with contextlib.suppress(StorageError):  # the remains of an interrupted restore
            await self._rbd(driver, "snap", "purge", "--no-progress", spec, what="cleaning a restore")
        with contextlib.suppress(StorageError):
            await self._rbd(driver, "rm", "--no-progress", spec, what="cleaning a restore")
        size = max(1, manifests[0].size_bytes)
        await self._rbd(driver, "create", "--size", f"{size}B", "--image-feature", FEATURES, spec,
                        what=f"restoring {vol.id}")  # fmt: skip
        for m in manifests:
            argv = self._rbd_argv(driver, "import-diff", "--no-progress", "-", spec)
            errfile = self.spool / f"restore-{vol.id}.err"
            with errfile.open("wb") as err:
                proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                            stdout=asyncio.subprocess.DEVNULL, stderr=err)  # fmt: skip
            assert proc.stdin is not None
            stdin = proc.stdin

            async def write(chunk: bytes, stdin: asyncio.StreamWriter = stdin) -> None:
                stdin.write(chunk)
                await stdin.drain()

            try:
                await stream_parts(s3, m.object, m.parts, write)
                stdin.close()
                rc = await proc.wait()
            except (BrokenPipeError, ConnectionResetError):
                rc = await proc.wait()
            finally:
                if proc.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
            reason = errfile.read_text(errors="replace").strip().splitlines()
            errfile.unlink(missing_ok=True)
            if rc != 0:
                raise StorageError(f"rbd import-diff of backup {m.backup} failed: {reason[-1] if reason else rc}")
        await self._rbd(driver, "snap", "purge", "--no-progress", spec, what=f"restoring {vol.id}")
        await self._rbd(driver, "rename", spec, f"{driver.pool}/{vol.id}", what=f"restoring {vol.id}")


__all__ = ["SWEEP_KEY", "BackupReconciler", "S3Bucket", "stream_parts", "upload_parts"]
