"""The minicloud Python SDK: a small synchronous client for the HTTP API.

::

    from minicloud.client import Client
    c = Client.local()                       # the Unix socket, as root
    c = Client.remote("lab")                 # a remote added with `minicloud remote add lab https://...`
    kp = c.keypairs.create(name="me", public_key=open("id_ed25519.pub").read())

Responses are decoded into the same msgspec types the server encodes (:mod:`minicloud.model`). Errors raise
:class:`ApiError`, which carries the server's RFC 9457 problem. The SDK uses only the standard library's
``http.client`` besides msgspec, so the CLI that is built on it starts fast.
"""

from __future__ import annotations

import http.client
import json as _json
import os
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import msgspec

from minicloud.client.collection import Collection
from minicloud.client.remotes import Remote, load_remotes
from minicloud.compute.kinds import KEYPAIR
from minicloud.iam.kinds import ACCESSKEY, APIKEY, PROJECT, ROLEBINDING, USER
from minicloud.model import (
    AccessKey,
    AccessKeySecret,
    ApiKey,
    ApiKeySecret,
    KeyPair,
    Node,
    Operation,
    Page,
    Problem,
    Project,
    RoleBinding,
    RoleInfo,
    User,
    Version,
    WhoAmI,
)

DEFAULT_SOCKET = "/run/minicloud/minicloud.sock"
T = TypeVar("T")


class ApiError(Exception):
    """The server answered with an error; ``problem`` is its RFC 9457 body."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.detail)
        self.problem = problem
        self.status = problem.status


class ConnectError(Exception):
    """The agent could not be reached at all."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def pinned_ssl_context(ca_pem: str | None) -> ssl.SSLContext:
    """Verify the server against exactly the pinned cluster CA (or not at all when ``ca_pem`` is None, used only to
    fetch the CA for first-use pinning). Host names are not checked: the pinned private CA is the trust anchor, and
    nodes are reached by whatever address the operator has."""
    if ca_pem is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ctx = ssl.create_default_context(cadata=ca_pem)
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class Response(msgspec.Struct):
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return _json.loads(self.body) if self.body else None


class Client:
    """A connection to one agent. Not thread-safe; cheap to create."""

    def __init__(
        self,
        *,
        socket_path: str | None = None,
        url: str | None = None,
        token: str | None = None,
        ca_pem: str | None = None,
        timeout: float = 60.0,
        project: str | None = None,
    ) -> None:
        if (socket_path is None) == (url is None):
            raise ValueError("give exactly one of socket_path or url")
        self.socket_path = socket_path
        self.url = urllib.parse.urlsplit(url) if url else None
        self.token = token
        self.ca_pem = ca_pem
        self.timeout = timeout
        #: Every request acts in this project (``?project=``); None: the server's default (``default``).
        self.project = project
        self._conn: http.client.HTTPConnection | None = None
        self.keypairs = KeyPairs(self)
        self.operations = Operations(self)
        self.apikeys = ApiKeys(self)
        self.accesskeys = AccessKeys(self)
        self.users = Users(self)
        self.projects = Projects(self)
        self.rolebindings = RoleBindings(self)
        from minicloud.client.compute import Images, Instances, InstanceTypes, Nodes, ServerGroups

        self.images = Images(self)
        self.types = InstanceTypes(self)
        self.instances = Instances(self)
        self.server_groups = ServerGroups(self)
        self.nodes = Nodes(self)
        from minicloud.client.network import Networks, Routers, SecurityGroups, Subnets

        self.networks = Networks(self)
        self.subnets = Subnets(self)
        self.security_groups = SecurityGroups(self)
        self.routers = Routers(self)
        from minicloud.client.floating_ip import FloatingIps

        self.floating_ips = FloatingIps(self)
        from minicloud.client.objects import Buckets, S3Api

        self.buckets = Buckets(self)
        self.s3 = S3Api(self)
        from minicloud.client.storage import Pools, Snapshots, StorageApi, Volumes

        self.volumes = Volumes(self)
        self.snapshots = Snapshots(self)
        self.pools = Pools(self)
        from minicloud.client.gpu import Gpus

        self.gpus = Gpus(self)
        self.storage = StorageApi(self)
        from minicloud.client.backups import BackupSchedules, BackupTargets, VolumeBackups

        self.volume_backups = VolumeBackups(self)
        self.backup_targets = BackupTargets(self)
        self.backup_schedules = BackupSchedules(self)
        from minicloud.client.metrics import Metrics

        self.metrics = Metrics(self)
        from minicloud.client.alarms import Alarms

        self.alarms = Alarms(self)
        from minicloud.client.logs import Logs

        self.logs = Logs(self)
        from minicloud.client.billing import Billing

        self.billing = Billing(self)
        from minicloud.client.cluster import ClusterSettings

        self.cluster_settings = ClusterSettings(self)

    # -- construction ----------------------------------------------------------------------------------------------
    @classmethod
    def local(cls, socket_path: str | None = None, **kw: Any) -> Client:
        return cls(socket_path=socket_path or os.environ.get("MINICLOUD_SOCKET") or DEFAULT_SOCKET, **kw)

    @classmethod
    def for_remote(cls, remote: Remote, **kw: Any) -> Client:
        return cls(url=remote.url, token=remote.token, ca_pem=remote.ca_pem(), **kw)

    @classmethod
    def remote(cls, name: str, **kw: Any) -> Client:
        remotes = load_remotes()
        if name not in remotes:
            raise ConnectError(f"no remote named '{name}'; add it with `minicloud remote add {name} https://HOST:PORT`")
        return cls.for_remote(remotes[name], **kw)

    @property
    def endpoint(self) -> str:
        return f"unix:{self.socket_path}" if self.socket_path else urllib.parse.urlunsplit(self.url)  # type: ignore[arg-type]

    # -- transport -------------------------------------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.socket_path:
                self._conn = _UnixConnection(self.socket_path, self.timeout)
            else:
                assert self.url is not None
                if self.url.scheme != "https":
                    raise ConnectError(f"remote URLs must be https:// (got {self.url.scheme}://)")
                self._conn = http.client.HTTPSConnection(
                    self.url.hostname or "localhost",
                    self.url.port or 8443,
                    timeout=self.timeout,
                    context=pinned_ssl_context(self.ca_pem),
                )
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def raw(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        body: bytes | None = None,
        query: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        """Send one request and return the response as it came, whatever its status."""
        query = {**(query or {}), "project": self.project} if self.project else query
        if query:
            clean = {k: v for k, v in query.items() if v is not None}
            if clean:
                path += ("&" if "?" in path else "?") + urllib.parse.urlencode(clean)
        hdrs = {"Accept": "application/json", **(headers or {})}
        if json is not None:
            body = msgspec.json.encode(json)
            hdrs.setdefault("Content-Type", "application/json")
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request(method, path, body=body, headers=hdrs)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
                # A kept-alive connection the server closed: retry once on a fresh one.
                self.close()
                if attempt:
                    raise ConnectError(f"the connection to {self.endpoint} was closed") from None
            except ssl.SSLCertVerificationError as exc:
                self.close()
                raise ConnectError(
                    f"TLS verification of {self.endpoint} failed ({exc.verify_message}); the server's certificate "
                    "is not signed by the pinned CA. If the cluster was re-initialised, remove and re-add the remote."
                ) from None
            except (FileNotFoundError, ConnectionRefusedError, socket.gaierror, TimeoutError, OSError) as exc:
                self.close()
                where = f"socket {self.socket_path}" if self.socket_path else urllib.parse.urlunsplit(self.url)  # type: ignore[arg-type]
                raise ConnectError(
                    f"cannot reach the minicloud agent at {where}: {exc.strerror or exc}. Is it running? "
                    "(`systemctl status minicloud`, or start it with `minicloud agent`)"
                ) from None
        return Response(status=resp.status, headers={k.lower(): v for k, v in resp.getheaders()}, body=data)

    def call(self, method: str, path: str, type: type[T] | None = None, **kw: Any) -> Any:
        """Send a request; raise :class:`ApiError` for an error status; decode the body into ``type``."""
        resp = self.raw(method, path, **kw)
        if resp.status >= 400:
            raise ApiError(_problem(resp))
        if not resp.body:
            return None
        return msgspec.json.decode(resp.body, type=type) if type is not None else msgspec.json.decode(resp.body)

    # -- system ----------------------------------------------------------------------------------------------------
    def version(self) -> Version:
        return self.call("GET", "/v1/version", Version)

    def node(self) -> Node:
        return self.call("GET", "/v1/node", Node)

    def whoami(self) -> WhoAmI:
        """Who this client's credential is on the server: principal, role bindings, credential and its expiry."""
        return self.call("GET", "/v1/whoami", WhoAmI)

    def paginate(self, path: str, item_type: type[T], **query: Any) -> Iterator[T]:
        """Every item of a collection, following ``next_cursor``."""
        cursor = None
        while True:
            page = self.call("GET", path, Page[item_type], query={**query, "cursor": cursor})  # type: ignore[valid-type]
            yield from page.items
            if not page.next_cursor:
                return
            cursor = page.next_cursor


def _problem(resp: Response) -> Problem:
    try:
        return msgspec.json.decode(resp.body, type=Problem)
    except msgspec.MsgspecError:
        text = resp.body[:200].decode("utf-8", "replace")
        return Problem(type="about:blank", title="HTTP error", status=resp.status, detail=text or f"HTTP {resp.status}")


class KeyPairs(Collection[KeyPair]):
    def __init__(self, client: Client) -> None:
        super().__init__(client, KEYPAIR)

    def create(
        self,
        *,
        name: str,
        public_key: str,
        description: str = "",
        labels: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> KeyPair:
        body = {"name": name, "public_key": public_key, "description": description, "labels": labels or {}}
        return self._create(body, idempotency_key)


class ApiKeys(Collection[ApiKey]):
    """``/v1/apikeys``: list/get from the kind's declaration; create returns the one-time secret; delete revokes."""

    def __init__(self, client: Client) -> None:
        super().__init__(client, APIKEY)

    def create(
        self,
        *,
        name: str | None = None,
        description: str = "",
        expires_in: int | None = None,
        user: str | None = None,
        labels: dict[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> ApiKeySecret:
        """Create a key acting as ``user`` (default: the caller); without ``name`` the server names it
        ``<user>-<random>``. The result holds the one-time ``secret``."""
        body: dict[str, Any] = {"description": description}
        if name is not None:
            body["name"] = name
        if user is not None:
            body["user"] = user
        if expires_in is not None:
            body["expires_in"] = expires_in
        if labels:
            body["labels"] = labels
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._c.call("POST", self.path, ApiKeySecret, json=body, headers=headers)


class AccessKeys(Collection[AccessKey]):
    """``/v1/accesskeys``: S3-style key pairs; create returns the one-time secret access key."""

    def __init__(self, client: Client) -> None:
        super().__init__(client, ACCESSKEY)

    def create(
        self,
        *,
        name: str,
        user: str | None = None,
        description: str = "",
        expires_in: int | None = None,
        expires_at: str | None = None,
        idempotency_key: str | None = None,
    ) -> AccessKeySecret:
        body: dict[str, Any] = {"name": name, "description": description}
        if user is not None:
            body["user"] = user
        if expires_in is not None:
            body["expires_in"] = expires_in
        if expires_at is not None:
            body["expires_at"] = expires_at
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._c.call("POST", self.path, AccessKeySecret, json=body, headers=headers)

    def disable(self, ref: str) -> AccessKey:
        """The object store refuses the key until :meth:`enable`."""
        return self._c.call("POST", f"{self.path}/{_q(ref)}/disable", AccessKey)

    def enable(self, ref: str) -> AccessKey:
        return self._c.call("POST", f"{self.path}/{_q(ref)}/enable", AccessKey)


class Users(Collection[User]):
    """``/v1/users``: users and service accounts."""

    def __init__(self, client: Client) -> None:
        super().__init__(client, USER)

    def create(
        self,
        *,
        name: str,
        email: str = "",
        type: str = "user",
        password: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> User:
        body: dict[str, Any] = {"name": name, "email": email, "type": type, "labels": labels or {}}
        if password is not None:
            body["password"] = password
        return self._create(body)


class Projects(Collection[Project]):
    """``/v1/projects``: tenancy boundaries (act in one with ``Client(project=…)``)."""

    def __init__(self, client: Client) -> None:
        super().__init__(client, PROJECT)

    def create(self, *, name: str, description: str = "", labels: dict[str, str] | None = None) -> Project:
        return self._create({"name": name, "description": description, "labels": labels or {}})


class RoleBindings(Collection[RoleBinding]):
    """``/v1/rolebindings`` (list, grant, revoke) and the roles (``/v1/roles``)."""

    def __init__(self, client: Client) -> None:
        super().__init__(client, ROLEBINDING)

    def grant(self, role: str, principal: str, project: str | None = None) -> RoleBinding:
        """Grant ``role`` to ``principal`` (``user:NAME``, ``serviceaccount:NAME``) in ``project`` (None:
        cluster-wide)."""
        return self._create({"role": role, "principal": principal, "scope_project": project})

    def revoke(self, ref: str) -> None:
        self.delete(ref)

    def roles(self) -> list[RoleInfo]:
        return self._c.call("GET", "/v1/roles", list[RoleInfo])

    def create_role(
        self,
        name: str,
        *,
        allow: list[str] | None = None,
        deny: list[str] | None = None,
        scope: str = "project",
        description: str = "",
    ) -> RoleInfo:
        body = {"name": name, "scope": scope, "allow": allow or [], "deny": deny or [], "description": description}
        return self._c.call("POST", "/v1/roles", RoleInfo, json=body)

    def delete_role(self, name: str) -> None:
        self._c.call("DELETE", f"/v1/roles/{_q(name)}")


class Operations:
    def __init__(self, client: Client) -> None:
        self._c = client

    def list(self, **query: Any) -> list[Operation]:
        return list(self._c.paginate("/v1/operations", Operation, **query))

    def get(self, ref: str, wait: float = 0) -> Operation:
        return self._c.call("GET", f"/v1/operations/{_q(ref)}", Operation, query={"wait": wait or None})

    def delete(self, ref: str) -> None:
        self._c.call("DELETE", f"/v1/operations/{_q(ref)}")

    def wait(
        self, ref: str, timeout: float = 3600, on_progress: Callable[[Operation], None] | None = None
    ) -> Operation:
        """Block until the operation ends (or ``timeout`` seconds pass); call ``on_progress`` on every change seen."""
        deadline = time.monotonic() + timeout
        op = self.get(ref)
        while op.state == "running" and time.monotonic() < deadline:
            if on_progress:
                on_progress(op)
            op = self.get(ref, wait=min(2.0, max(0.1, deadline - time.monotonic())))
        if on_progress:
            on_progress(op)
        return op


def _q(ref: str) -> str:
    return urllib.parse.quote(ref, safe="")
