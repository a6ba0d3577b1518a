"""SDK for compute: images, instance types and instances (``client.images``, ``client.types``, ``client.instances``)."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import os
import select
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

from minicloud.client.collection import Collection
from minicloud.compute.kinds import IMAGE, INSTANCE, SERVERGROUP
from minicloud.model import Operation, Problem
from minicloud.model.compute import ComputeNode, Image, Instance, InstanceType, ServerGroup

if TYPE_CHECKING:
    from minicloud.client import Client

#: States an instance rests in; ``wait`` returns at one of these (or when the instance is gone).
SETTLED = frozenset({"running", "stopped", "error"})
#: Bytes read (hashed, sent) at a time by :meth:`Images.upload`.
UPLOAD_CHUNK = 1 << 20
#: How long :meth:`Images.upload` waits for the answer once the body is sent: the node checks the disk with
#: qemu-img (``qemu-img check`` of a large qcow2 takes a while) before it answers.
UPLOAD_ANSWER_TIMEOUT = 600.0
#: ``progress(phase, done, total)``: phase ``hashing`` (reading the file for its SHA-256) or ``uploading``.
Progress = Callable[[str, int, int], None]


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

    def upload(
        self,
        name: str,
        path: str | os.PathLike[str],
        *,
        sha256: str | None = None,
        format: str | None = None,
        firmware: str | None = None,
        pool: str | None = None,
        os_distro: str | None = None,
        os_version: str | None = None,
        description: str | None = None,
        labels: dict[str, str] | None = None,
        progress: Progress | None = None,
        idempotency_key: str | None = None,
    ) -> Image:
        """Upload the disk image (qcow2 or raw) at ``path`` on this machine as image ``name``
        (``PUT /v1/images/{name}/file``) and return it (201).

        The file is read twice and never held in memory: once for its SHA-256 (skipped when ``sha256=`` is given,
        which then makes another file fail the upload), once to stream it. The node checks the SHA-256, then the
        disk as for a node-path import, and keeps nothing when anything fails. ``progress(phase, done, total)`` is
        called as the file is hashed (``hashing``) and sent (``uploading``). ``labels`` values may not contain
        commas. With ``idempotency_key``, a retry after a lost answer gets the first answer (the body is sent
        again, and not read)."""
        with open(path, "rb") as f:
            total = os.fstat(f.fileno()).st_size
            digest = sha256.lower() if sha256 else _sha256_of(f, total, progress)
            f.seek(0)
            fields = {
                "format": format,
                "firmware": firmware,
                "pool": pool,
                "os_distro": os_distro,
                "os_version": os_version,
                "description": description,
                "labels": ",".join(f"{k}={v}" for k, v in (labels or {}).items()) or None,
            }
            headers = {
                "Content-Type": "application/octet-stream",
                "Content-Length": str(total),
                "X-Checksum-Sha256": digest,
            }
            if idempotency_key:
                headers["Idempotency-Key"] = idempotency_key
            return self._put_file(f"{self.path}/{_q(name)}/file", fields, headers, f, total, progress)

    def _put_file(
        self,
        path: str,
        query: dict[str, Any],
        headers: dict[str, str],
        f: BinaryIO,
        total: int,
        progress: Progress | None,
    ) -> Image:
        """Send one streamed PUT on a fresh connection (never retried: the body cannot be sent twice). The node
        answers a refusal (a taken name, too large, no permission…) before it reads the body: the answer is looked
        for between chunks, and sending stops as soon as it has come."""
        import msgspec

        from minicloud.client import ApiError, ConnectError, _problem

        c = self._c
        query = {**query, "project": c.project} if c.project else query
        clean = {k: v for k, v in query.items() if v is not None}
        if clean:
            path += "?" + urllib.parse.urlencode(clean)
        headers = {"Accept": "application/json", **headers}
        if c.token:
            headers["Authorization"] = f"Bearer {c.token}"
        c.close()  # a fresh connection: a kept-alive one the server closed would fail mid-body
        conn = c._connection()
        conn.timeout = max(conn.timeout or 0, UPLOAD_ANSWER_TIMEOUT)
        try:
            early = _EarlyAnswer(conn)
            # A server that refuses early (taken name, too large…) answers and closes: its answer may still be read.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.request("PUT", path, body=_chunks(f, total, progress, early), headers=headers)
            try:
                if early.head:  # the first bytes of the answer were read while looking for it: parse them first
                    resp = http.client.HTTPResponse(_Prefixed(early.head, conn.sock), method="PUT")  # type: ignore[arg-type]
                    resp.begin()
                else:
                    resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                raise ConnectError(f"the upload to {c.endpoint} failed: the connection closed ({exc})") from None
        except ConnectError:
            raise
        except OSError as exc:
            raise ConnectError(f"cannot reach the minicloud agent at {c.endpoint}: {exc.strerror or exc}") from None
        finally:
            c.close()
        from minicloud.client import Response

        answer = Response(status=resp.status, headers={k.lower(): v for k, v in resp.getheaders()}, body=data)
        if answer.status >= 400:
            raise ApiError(_problem(answer))
        return msgspec.json.decode(answer.body, type=Image)


def _sha256_of(f: BinaryIO, total: int, progress: Progress | None) -> str:
    digest = hashlib.sha256()
    done = 0
    if progress:
        progress("hashing", 0, total)
    while chunk := f.read(UPLOAD_CHUNK):
        digest.update(chunk)
        done += len(chunk)
        if progress:
            progress("hashing", done, total)
    return digest.hexdigest()


class _EarlyAnswer:
    """``answered()`` for :func:`_chunks`: whether the server has answered (a refusal) before the body is all sent.

    On a plain socket, readable means the answer is there (left for ``getresponse``). TLS 1.3 servers also send
    session tickets after the handshake, which make the socket readable without any answer: a non-blocking read
    tells them apart — nothing (``SSLWantReadError``) after the tickets are processed, or the answer's first bytes,
    kept in :attr:`head` for the response parser."""

    def __init__(self, conn: http.client.HTTPConnection) -> None:
        self.conn = conn
        self.head = b""
        self.answered = False

    def __call__(self) -> bool:
        sock = self.conn.sock
        if self.answered or sock is None:
            return self.answered
        tls = isinstance(sock, ssl.SSLSocket)
        if not (tls and sock.pending()) and not select.select([sock], [], [], 0)[0]:
            return False
        if tls:
            timeout = sock.gettimeout()
            sock.setblocking(False)
            try:
                self.head = sock.recv(65536)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return False  # only TLS housekeeping
            except OSError:
                pass  # the connection broke: stop sending, the answer (if any) is read next
            finally:
                sock.settimeout(timeout)
        self.answered = True
        return True


class _Prefixed:
    """A socket for :class:`http.client.HTTPResponse` whose stream starts with ``head``, then the socket's bytes."""

    def __init__(self, head: bytes, sock: Any) -> None:
        self._raw = _PrefixedRaw(head, sock)

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(self._raw)


class _PrefixedRaw(io.RawIOBase):
    def __init__(self, head: bytes, sock: Any) -> None:
        self._head = head
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return self._sock.recv_into(buffer)


def _chunks(
    f: BinaryIO, total: int, progress: Progress | None, answered: Callable[[], bool] = lambda: False
) -> Iterator[bytes]:
    """The file's first ``total`` bytes (what Content-Length announced), chunk by chunk, reporting progress; stops
    early when ``answered()`` (the server refused the upload without reading it)."""
    sent = 0
    if progress:
        progress("uploading", 0, total)
    while sent < total and not answered() and (chunk := f.read(min(UPLOAD_CHUNK, total - sent))):
        sent += len(chunk)
        yield chunk
        if progress:
            progress("uploading", sent, total)
    if sent < total and not answered():  # the connection is closed unanswered: the node keeps nothing
        raise ValueError(f"the file shrank to {sent} bytes while it was uploaded ({total} announced)")


class InstanceTypes:
    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self) -> list[InstanceType]:
        return list(self._c.paginate("/v1/instance-types", InstanceType))

    def get(self, name: str) -> InstanceType:
        return self._c.call("GET", f"/v1/instance-types/{_q(name)}", InstanceType)

    def create(
        self, *, name: str, vcpus: int, memory_mib: int, disk_gib: int, description: str = "", gpus: int = 0,
        gpu_model: str = "",
    ) -> InstanceType:  # fmt: skip
        body: dict[str, object] = {
            "name": name,
            "vcpus": vcpus,
            "memory_mib": memory_mib,
            "disk_gib": disk_gib,
            "description": description,
        }
        if gpus:
            body["gpus"] = gpus
        if gpu_model:
            body["gpu_model"] = gpu_model
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

    def migrate(self, ref: str, *, node: str | None = None, cold: bool = False) -> Operation:
        """Live-migrate the instance to ``node`` (default: the scheduler's pick); an operation follows it."""
        body: dict[str, Any] = {"cold": cold} if node is None else {"node": node, "cold": cold}
        return self._c.call("POST", f"{self.path}/{_q(ref)}/migrate", Operation, json=body)

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


class ServerGroups(Collection[ServerGroup]):
    """``/v1/server-groups``: list and update from the kind's declaration; create, show (with members) and delete
    (409 while it has members)."""

    def __init__(self, client: Client) -> None:
        super().__init__(client, SERVERGROUP)

    def create(
        self,
        *,
        name: str,
        policy: str,
        scope: str = "node",
        description: str = "",
        labels: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> ServerGroup:
        """``policy``: ``anti-affinity``, ``affinity`` or ``soft-anti-affinity``; ``scope``: ``node`` or ``zone``."""
        body = {"name": name, "policy": policy, "scope": scope, "description": description, "labels": labels or {}}
        return self._create(body, idempotency_key)


class Nodes:
    """``/v1/nodes``: the compute nodes as the scheduler sees them; cordon and uncordon (cluster administrators)."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self) -> list[ComputeNode]:
        return self._c.call("GET", "/v1/nodes", list[ComputeNode])

    def cordon(self, name: str, *, reason: str = "") -> ComputeNode:
        """No new instances on ``name`` (those on it stay)."""
        return self._c.call("POST", f"/v1/nodes/{_q(name)}/cordon", ComputeNode, json={"reason": reason})

    def uncordon(self, name: str) -> ComputeNode:
        return self._c.call("POST", f"/v1/nodes/{_q(name)}/uncordon", ComputeNode)

    def drain(self, name: str) -> Operation:
        """Cordon ``name`` and live-migrate what can move off it; the operation's result says what moved and what
        stays (and why)."""
        return self._c.call("POST", f"/v1/nodes/{_q(name)}/drain", Operation)
