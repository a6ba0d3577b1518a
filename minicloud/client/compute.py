"""SDK for compute: images, instance types and instances (``client.images``, ``client.types``, ``client.instances``)."""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from minicloud.client.collection import Collection
from minicloud.compute.kinds import IMAGE, INSTANCE
from minicloud.model import Operation, Problem
from minicloud.model.compute import Image, Instance, InstanceType

if TYPE_CHECKING:
    from minicloud.client import Client

#: States an instance rests in; ``wait`` returns at one of these (or when the instance is gone).
SETTLED = frozenset({"running", "stopped", "error"})


def _q(ref: str) -> str:
    return urllib.parse.quote(ref, safe="")


class Images(Collection[Image]):
    """``/v1/images``: list, get, update and delete come from the kind's declaration; imports are its own."""

    def __init__(self, client: Client) -> None:
        super().__init__(client, IMAGE)

    def create(self, *, name: str, **fields: Any) -> Image:
        """Import an image from files on the node: ``path=`` (a disk), or ``kernel=`` (+ ``initrd=``, ``cmdline=``);
        paths must be under the node's ``compute.image_dirs``. For a URL, see :meth:`import_url`."""
        body = {"name": name, **{k: v for k, v in fields.items() if v is not None}}
        return self._c.call("POST", self.path, Image, json=body)

    def import_url(self, *, name: str, url: str, sha256: str | None = None, **fields: Any) -> Operation:
        """Start downloading a disk image from ``url`` on the node: returns the operation (``client.operations.wait``
        follows it; its ``result["image_id"]`` names the image). ``sha256=`` makes a different file fail the import.
        The node refuses internal addresses unless its ``compute.image_url_allow`` lists them."""
        body = {"name": name, "url": url, "sha256": sha256, **fields}
        return self._c.call("POST", self.path, Operation, json={k: v for k, v in body.items() if v is not None})


class InstanceTypes:
    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self) -> list[InstanceType]:
        return list(self._c.paginate("/v1/instance-types", InstanceType))

    def get(self, name: str) -> InstanceType:
        return self._c.call("GET", f"/v1/instance-types/{_q(name)}", InstanceType)

    def create(self, *, name: str, vcpus: int, memory_mib: int, disk_gib: int, description: str = "") -> InstanceType:
        body = {
            "name": name,
            "vcpus": vcpus,
            "memory_mib": memory_mib,
            "disk_gib": disk_gib,
            "description": description,
        }
        return self._c.call("POST", "/v1/instance-types", InstanceType, json=body)

    def delete(self, name: str) -> None:
        self._c.call("DELETE", f"/v1/instance-types/{_q(name)}")


class Instances(Collection[Instance]):
    """``/v1/instances``: list, get and update come from the kind's declaration; create, the power verbs, resize,
    delete (202: the node tears the instance down) and the console are its own."""

    def __init__(self, client: Client) -> None:
        super().__init__(client, INSTANCE)

    def create(
        self,
        *,
        name: str,
        type: str,
        image: str | None = None,
        boot_volume: str | None = None,
        pool: str | None = None,
        idempotency_key: str | None = None,
        **fields: Any,
    ) -> Instance:
        """Create an instance from ``image`` or booting ``boot_volume`` (the root disk in ``pool``: default, the
        image's Ceph pool, else local) (``keypair``, ``user_data``, ``disk_gib``, ``start``, ``description``,
        ``labels``, ``nics``: a list of ``{"subnet"|"network": …, "ip": …, "security_groups": [...]}``)."""
        given = {"image": image, "boot_volume": boot_volume, "pool": pool, **fields}
        body = {"name": name, "type": type, **{k: v for k, v in given.items() if v is not None}}
        return self._create(body, idempotency_key)

    def _verb(self, ref: str, verb: str, body: dict[str, Any] | None = None) -> Instance:
        return self._c.call("POST", f"{self.path}/{_q(ref)}/{verb}", Instance, json=body)

    def start(self, ref: str) -> Instance:
        return self._verb(ref, "start")

    def stop(self, ref: str, *, force: bool = False) -> Instance:
        return self._verb(ref, "stop", {"force": force})

    def reboot(self, ref: str, *, force: bool = False) -> Instance:
        return self._verb(ref, "reboot", {"force": force})

    def resize(self, ref: str, *, type: str) -> Instance:
        return self._verb(ref, "resize", {"type": type})

    def add_nic(
        self,
        ref: str,
        *,
        subnet: str | None = None,
        network: str | None = None,
        ip: str | None = None,
        security_groups: list[str] | None = None,
    ) -> Instance:
        """Give the instance another NIC (on ``subnet`` or ``network``; hot-plugged while it runs)."""
        nic = {"subnet": subnet, "network": network, "ip": ip, "security_groups": security_groups}
        return self._verb(ref, "nics", {k: v for k, v in nic.items() if v is not None})

    def remove_nic(self, ref: str, nic: str) -> Instance:
        """Unplug and delete one NIC: its port id, MAC or address."""
        return self._c.call("DELETE", f"{self.path}/{_q(ref)}/nics/{_q(nic)}", Instance)

    def delete(self, ref: str, *, if_match: int | None = None) -> Instance | None:  # type: ignore[override]
        """Ask for the deletion: the instance in ``deleting`` (None when it went at once); :meth:`wait` until gone."""
        headers = {"If-Match": f'"{if_match}"'} if if_match is not None else None
        return self._c.call("DELETE", f"{self.path}/{_q(ref)}", Instance, headers=headers)

    def wait(
        self,
        ref: str,
        *,
        until: Callable[[Instance], bool] | None = None,
        timeout: float = 600,
        interval: float = 0.25,
        on_change: Callable[[Instance], None] | None = None,
    ) -> Instance | None:
        """Poll until ``until(instance)`` (default: it settled in running, stopped or error and has no pending
        change); None when the instance is gone (deleted). ``TimeoutError`` after ``timeout`` seconds."""
        from minicloud.client import ApiError

        until = until or (
            lambda i: i.status.state == "error" or (i.status.state in SETTLED and i.status.state == i.power)
        )
        deadline = time.monotonic() + timeout
        last = None
        while True:
            try:
                inst = self.get(ref)
            except ApiError as exc:
                if exc.problem.status == 404:
                    return None
                raise
            if on_change and (last is None or inst.status.state != last):
                on_change(inst)
            last = inst.status.state
            if until(inst):
                return inst
            if time.monotonic() > deadline:
                raise TimeoutError(f"instance {ref} is still {inst.status.state} after {timeout:.0f} s")
            time.sleep(interval)

    def console(self, ref: str, *, tail: int = 0) -> bytes:
        """The serial console log so far."""
        resp = self._c.raw("GET", f"/v1/instances/{_q(ref)}/console", query={"tail": tail or None})
        if resp.status >= 400:
            from minicloud.client import ApiError, _problem

            raise ApiError(_problem(resp))
        return resp.body

    def follow_console(self, ref: str, *, tail: int = 0) -> Iterator[bytes]:
        """Stream the console log as the guest writes it, until the instance is deleted."""
        import msgspec

        from minicloud.client import ApiError

        query = {"follow": "true", "tail": tail or None}
        if self._c.project:
            query["project"] = self._c.project
        path = f"/v1/instances/{_q(ref)}/console?" + urllib.parse.urlencode({k: v for k, v in query.items() if v})
        conn = self._c._connection()
        headers = {"Authorization": f"Bearer {self._c.token}"} if self._c.token else {}
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        if resp.status >= 400:
            body = resp.read()
            raise ApiError(msgspec.json.decode(body, type=Problem))
        try:
            while chunk := resp.read1(65536):
                yield chunk
        finally:
            self._c.close()
