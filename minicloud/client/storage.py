"""SDK for storage: ``client.volumes``, ``client.snapshots``, ``client.pools`` and ``client.storage`` (the Ceph
cluster and its disks). List, get, update and delete come from each kind's declaration (:class:`Collection`);
creates and verbs are here."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from minicloud.client.collection import Collection, quote
from minicloud.model.storage import Pool, Snapshot, Storage, StorageDisk, Volume
from minicloud.storage.kinds import POOL, SNAPSHOT, VOLUME

if TYPE_CHECKING:
    from minicloud.client import Client


def _body(**fields: Any) -> dict[str, Any]:
    """The JSON body: fields left as None are the server's defaults."""
    return {k: v for k, v in fields.items() if v is not None}


def _headers(if_match: int | None) -> dict[str, str] | None:
    return {"If-Match": f'"{if_match}"'} if if_match is not None else None


class Volumes(Collection[Volume]):
    def __init__(self, client: Client) -> None:
        super().__init__(client, VOLUME)

    def create(self, *, name: str, size_gib: int, idempotency_key: str | None = None, **fields: Any) -> Volume:
        """``pool=``, ``image=`` or ``snapshot=``, ``qos={"read_iops_sec": …}``, ``description=``, ``labels=``."""
        return self._create(_body(name=name, size_gib=size_gib, **fields), idempotency_key)

    def delete(self, ref: str, *, if_match: int | None = None, force: bool = False) -> Volume | None:  # type: ignore[override]
        """Ask for the deletion: the volume in ``deleting`` (None when the record went at once)."""
        query = {"force": "true"} if force else None
        return self._c.call("DELETE", f"{self.path}/{quote(ref)}", Volume, headers=_headers(if_match), query=query)

    def _verb(self, ref: str, verb: str, body: dict[str, Any]) -> Volume:
        return self._c.call("POST", f"{self.path}/{quote(ref)}/{verb}", Volume, json=body)

    def attach(self, ref: str, *, instance: str, device: str | None = None) -> Volume:
        return self._verb(ref, "attach", _body(instance=instance, device=device))

    def detach(self, ref: str, *, force: bool = False) -> Volume:
        return self._verb(ref, "detach", {"force": force})

    def extend(self, ref: str, *, size_gib: int) -> Volume:
        return self._verb(ref, "extend", {"size_gib": size_gib})

    def flatten(self, ref: str) -> Volume:
        """Ask for a volume made from a snapshot to stop depending on it (``status.flattened`` once its node copied
        the data; then the snapshot can be deleted). Asking again answers the volume unchanged."""
        return self._c.call("POST", f"{self.path}/{quote(ref)}/flatten", Volume)

    def wait(
        self,
        ref: str,
        *,
        until: Callable[[Volume], bool] | None = None,
        timeout: float = 600,
        interval: float = 0.25,
    ) -> Volume | None:
        """Poll until ``until(volume)`` (default: ``available``, ``in-use`` or ``error``); None once it is gone.
        ``TimeoutError`` after ``timeout`` seconds."""
        from minicloud.client import ApiError

        until = until or (lambda v: v.status.state in ("available", "in-use", "error"))
        deadline = time.monotonic() + timeout
        while True:
            try:
                vol = self.get(ref)
            except ApiError as exc:
                if exc.problem.status == 404:
                    return None
                raise
            if until(vol):
                return vol
            if time.monotonic() > deadline:
                raise TimeoutError(f"volume {ref} is still {vol.status.state} after {timeout:.0f} s")
            time.sleep(interval)


class Snapshots(Collection[Snapshot]):
    def __init__(self, client: Client) -> None:
        super().__init__(client, SNAPSHOT)

    def create(
        self, *, name: str, volume: str | None = None, idempotency_key: str | None = None, **fields: Any
    ) -> Snapshot:
        """Of ``volume=``, or of an instance's root disk (``instance=``)."""
        return self._create(_body(name=name, volume=volume, **fields), idempotency_key)

    def delete(self, ref: str, *, if_match: int | None = None) -> Snapshot | None:  # type: ignore[override]
        return self._c.call("DELETE", f"{self.path}/{quote(ref)}", Snapshot, headers=_headers(if_match))

    def revert(self, ref: str) -> Volume | Snapshot:
        """Revert the snapshot's volume to it (answers the volume), or its instance's root disk (answers the
        snapshot: ``status.reason`` says when the instance's node could not)."""
        raw = self._c.call("POST", f"{self.path}/{quote(ref)}/revert")
        return msgspec.convert(raw, Snapshot if raw.get("instance_id") else Volume)


class Pools(Collection[Pool]):
    def __init__(self, client: Client) -> None:
        super().__init__(client, POOL)

    def create(self, *, name: str, driver: str, idempotency_key: str | None = None, **fields: Any) -> Pool:
        """``ceph_pool=`` (ceph), ``default=True``, ``description=``, ``labels=`` (administrators)."""
        return self._create(_body(name=name, driver=driver, **fields), idempotency_key)


class StorageApi:
    """``/v1/storage``: the Ceph cluster (``show``, ``enable``) and its disks."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def show(self) -> Storage:
        return self._c.call("GET", "/v1/storage", Storage)

    def enable(self, *, node: str | None = None, file_size_bytes: int | None = None, no_disk: bool = False) -> Storage:
        body = _body(node=node, file_size_bytes=file_size_bytes, no_disk=no_disk or None)
        return self._c.call("POST", "/v1/storage/enable", Storage, json=body)

    def wait_ready(self, *, timeout: float = 600, interval: float = 1.0) -> Storage:
        """Poll until the cluster is ``ready`` (``RuntimeError`` on ``error``, ``TimeoutError`` after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            shown = self.show()
            if shown.state == "ready":
                return shown
            if shown.state == "error":
                raise RuntimeError(f"storage is in error: {shown.reason or shown.summary}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"storage is still {shown.state} after {timeout:.0f} s: {shown.summary}")
            time.sleep(interval)

    def disks(self) -> list[StorageDisk]:
        return self._c.call("GET", "/v1/storage/disks", list[StorageDisk])

    def add_disk(
        self, *, node: str | None = None, device: str | None = None, file_size_bytes: int | None = None
    ) -> StorageDisk:
        body = _body(node=node, device=device, file_size_bytes=file_size_bytes)
        return self._c.call("POST", "/v1/storage/disks", StorageDisk, json=body)

    def remove_disk(self, ref: str) -> StorageDisk:
        return self._c.call("DELETE", f"/v1/storage/disks/{quote(ref)}", StorageDisk)
