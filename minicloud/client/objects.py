"""SDK for the object store: ``client.buckets`` and ``client.s3`` (the endpoint). List, get, update and delete come
from the bucket kind's declaration (:class:`Collection`); create, ``set`` and delete are here."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from minicloud.client.collection import Collection, quote
from minicloud.model.objects import Bucket, S3Endpoint, S3Usage
from minicloud.objects.kinds import BUCKET

if TYPE_CHECKING:
    from minicloud.client import Client


class Buckets(Collection[Bucket]):
    def __init__(self, client: Client) -> None:
        super().__init__(client, BUCKET)

    def create(self, *, name: str, idempotency_key: str | None = None, **fields: Any) -> Bucket:
        """``versioning=``, ``public_read=``, ``quota_bytes=``, ``quota_objects=``, ``description=``, ``labels=``."""
        body = {k: v for k, v in {"name": name, **fields}.items() if v is not None}
        return self._create(body, idempotency_key)

    def set(self, ref: str, **fields: Any) -> Bucket:
        """Change ``versioning``, ``public_read``, ``quota_bytes`` or ``quota_objects`` (None: unchanged)."""
        body = {k: v for k, v in fields.items() if v is not None}
        return self._c.call("POST", f"{self.path}/{quote(ref)}/set", Bucket, json=body)

    def delete(self, ref: str, *, if_match: int | None = None) -> Bucket | None:  # type: ignore[override]
        """Delete an empty bucket (None once gone; the bucket in ``deleting`` when the leading node finishes it)."""
        headers = {"If-Match": f'"{if_match}"'} if if_match is not None else None
        return self._c.call("DELETE", f"{self.path}/{quote(ref)}", Bucket, headers=headers)

    def wait(
        self, ref: str, *, until: Callable[[Bucket], bool], timeout: float = 120, interval: float = 0.25
    ) -> Bucket:
        """Poll until ``until(bucket)``; TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            bucket = self.get(ref)
            if until(bucket):
                return bucket
            if time.monotonic() > deadline:
                raise TimeoutError(f"bucket {ref} is still {bucket.status.state} after {timeout:.0f} s")
            time.sleep(interval)


class S3Api:
    def __init__(self, client: Client) -> None:
        self._c = client

    def endpoint(self, *, key: str | None = None) -> S3Endpoint:
        """The S3 endpoint (URLs, CA bundle, client settings; ``key``: an access key id to put in them)."""
        return self._c.call("GET", "/v1/s3/endpoint", S3Endpoint, query={"key": key} if key else None)

    def usage(self) -> S3Usage:
        """The project's quota in force and its buckets' usage and metering (requests, bytes out and in)."""
        return self._c.call("GET", "/v1/s3/usage", S3Usage)

    def set_quota(self, *, quota_bytes: Any = ..., quota_objects: Any = ...) -> S3Usage:
        """Set the project's quota (administrators): an int (0 unlimited), None (the configuration's), or leave out."""
        body = {k: v for k, v in {"quota_bytes": quota_bytes, "quota_objects": quota_objects}.items() if v is not ...}
        return self._c.call("POST", "/v1/s3/quota", S3Usage, json=body)
