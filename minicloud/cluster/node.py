"""This node's part in a cluster: its etcd member, the switch of the store to etcd, heartbeats and leadership.

State that must survive restarts lives in ``<data_dir>/cluster.json`` (written atomically):

- ``enable()`` turns the single node into a one-member etcd cluster and copies its state into etcd.
- ``issue_token()`` / ``admit()`` run on a member: a one-time token, then the joining node's request is checked,
  its CSR signed, and it is added to etcd (voter or learner).
- ``join()`` runs on the new node: pin the CA from the token, send a CSR, install the certificates, start its
  etcd member and follow the cluster's state (its own single-node state is replaced).
- Loops: a heartbeat lease per node (``/mc/live/<node>``, so ``cluster list`` knows who is online and since when),
  and the ``cluster-services`` leadership (``/mc/leader``, lease-backed): exactly one node runs the leader loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import os
import shutil
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import psutil

from agent.etcd import EtcdMember, EtcdMemberConfig, client_ssl_context
from minicloud import errors, ids
from minicloud.cluster import join as joinlib
from minicloud.cluster import storage as storage_mod
from minicloud.cluster.kinds import JOINTOKEN, NODE, JoinTokenSpec, NodeSpec, NodeStatus
from minicloud.config import Config
from minicloud.core.context import Context
from minicloud.core.write import Written, commit
from minicloud.iam.keystore import KeyStore
from minicloud.model import ClusterMember, EtcdStorage, JoinReply, JoinTokenIssued
from minicloud.pki import NodePKI
from minicloud.state import Create, Delete, Txn, TxnFailed, Update
from minicloud.state.etcd import EtcdStore, migrate_to_etcd
from minicloud.state.etcd_client import EtcdClient, EtcdError, cmp_create, op_put, prefix_end
from minicloud.state.handle import StoreHandle

log = logging.getLogger("minicloud.cluster")

LIVE = b"/mc/live/"
LEADER = b"/mc/leader"
HEARTBEAT_TTL = 5
LEADER_TTL = 3
#: A voter offline this long gets an online learner promoted in its place (it still counts until removed).
PROMOTE_AFTER = 30.0
TICK = 1.0
#: How often the services leader looks at etcd's storage (defragmentation, NOSPACE alarm).
STORAGE_EVERY = 600.0


class ClusterState(msgspec.Struct, kw_only=True):
    node: str
    address: str
    client_url: str
    peer_url: str
    endpoints: list[str]
    initial_cluster: dict[str, str]
    initial_state: str
    role: str = "voter"


def _atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def advertise_address(config: Config) -> str:
    """The address other nodes reach this one on: ``cluster.address``, else the HTTPS listen host when it is a
    specific address, else the first non-loopback IPv4 address of the host."""
    if config.cluster.address:
        return config.cluster.address
    listen = config.listen_address()
    if listen and listen[0] not in ("0.0.0.0", "::", ""):
        return listen[0]
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return "127.0.0.1"


def _url(host: str, port: int) -> str:
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def _check_https(https: str, address: str) -> None:
    """A joining node's HTTPS URL must be ``https://ADDRESS:PORT`` on the address it joins with (other nodes call
    it with their client certificates: it may not point them anywhere else)."""
    if not https:
        return
    prefix = _url(address, 0)[: -len(":0")] + ":"
    port = https[len(prefix) :] if https.startswith(prefix) else ""
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise errors.ValidationFailed(f"https must be https://{address}:PORT (this node's own address), not {https!r}")


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


class ClusterNode:
    """Owned by the agent (one per process); the cluster API calls into it."""

    def __init__(self, config: Config, pki: NodePKI, store: StoreHandle, https_ssl: ssl.SSLContext | None) -> None:
        self.config = config
        self.pki = pki
        self.store = store
        self.https_ssl = https_ssl
        self.state_file = config.data_path / "cluster.json"
        self.state: ClusterState | None = None
        self.member: EtcdMember | None = None
        self.client: EtcdClient | None = None
        self.leader: str | None = None
        self.is_leader = False
        self._leader_lease = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._lock = asyncio.Lock()
        self._voter_down_since: dict[str, float] = {}
        self._storage_task: asyncio.Task[None] | None = None
        self._storage_due = 0.0
        #: Called with the cluster's session signing key (PEM) when this node joins.
        self.on_session_key: Callable[[bytes], None] | None = None
        #: Called with the cluster's key store (``KeyStore.export()``) when this node joins.
        self.on_keystore: Callable[[dict[str, str]], None] | None = None

    @property
    def name(self) -> str:
        return self.config.node_name

    @property
    def enabled(self) -> bool:
        return self.state is not None

    # -- start and stop --------------------------------------------------------------------------------------------
    def load_state(self) -> ClusterState | None:
        try:
            return msgspec.json.decode(self.state_file.read_bytes(), type=ClusterState)
        except FileNotFoundError:
            return None

    def _save_state(self, state: ClusterState) -> None:
        _atomic_write(self.state_file, msgspec.json.encode(state))
        self.state = state

    def _etcd_client(self, endpoints: list[str]) -> EtcdClient:
        ctx = client_ssl_context(self.pki.ca_cert, self.pki.server_cert, self.pki.server_key)
        return EtcdClient(endpoints, ctx)

    def _member_config(self, state: ClusterState) -> EtcdMemberConfig:
        return EtcdMemberConfig(
            name=self.name,
            data_dir=self.config.data_path / "etcd",
            client_url=state.client_url,
            peer_url=state.peer_url,
            ca_file=self.pki.ca_cert,
            cert_file=self.pki.server_cert,
            key_file=self.pki.server_key,
            initial_cluster=state.initial_cluster,
            initial_state=state.initial_state,
            log_file=self.config.data_path / "etcd.log",
            quota_backend_bytes=self.config.cluster.etcd_quota_bytes,
            history_revisions=self.config.cluster.etcd_history_revisions,
        )

    async def start(self) -> None:
        """On agent start: if this node is in a cluster, start its etcd member and follow the cluster's state."""
        state = self.load_state()
        if state is None:
            return
        self.state = state
        self.member = EtcdMember(self._member_config(state))
        await self.member.spawn()
        self.client = self._etcd_client(state.endpoints)
        backend = EtcdStore(self.store.local, self.client)
        await backend.open()
        self.store.backend = backend
        self._start_loops()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self.is_leader and self.client is not None:
            with contextlib.suppress(EtcdError):
                await self.client.lease_revoke(self._leader_lease)
        if self.member is not None:
            await self.member.stop()

    # -- enable ----------------------------------------------------------------------------------------------------
    async def enable(self, ctx: Context, zone: str = "") -> Written | None:
        """Make this single node a one-member cluster, copying every record into etcd, and register this node (the
        write ``ctx`` is audited with). Idempotent: None when the node already was in a cluster."""
        async with self._lock:
            if self.state is not None:
                return None
            address = advertise_address(self.config)
            c = self.config.cluster
            state = ClusterState(
                node=self.name,
                address=address,
                client_url=_url(address, c.etcd_client_port),
                peer_url=_url(address, c.etcd_peer_port),
                endpoints=[_url(address, c.etcd_client_port)],
                initial_cluster={self.name: _url(address, c.etcd_peer_port)},
                initial_state="new",
            )
            shutil.rmtree(self.config.data_path / "etcd", ignore_errors=True)
            member = EtcdMember(self._member_config(state))
            await member.start()
            client = self._etcd_client(state.endpoints)

            async def change() -> EtcdStore:
                await migrate_to_etcd(self.store.local, client)
                backend = EtcdStore(self.store.local, client)
                await backend.open()
                return backend

            try:
                await self.store.switch(change)
            except BaseException:
                await member.stop()
                await client.close()
                raise
            self.member, self.client = member, client
            state.initial_state = "existing"  # a restart rejoins the cluster it created
            self._save_state(state)
            written = await self._register_node(ctx, state, zone)
            self._start_loops()
            log.info("cluster enabled", extra={"node": self.name, "address": address})
            return written

    async def _member_add(self, peer_url: str, timeout: float = 60) -> dict[str, Any]:
        """Add a learner; etcd refuses while a recent membership change settles ("unhealthy cluster"), so retry."""
        assert self.client is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                return await self.client.member_add([peer_url], learner=True)
            except EtcdError as exc:
                transient = "unhealthy cluster" in str(exc) or "too many learner" in str(exc)
                if not transient or asyncio.get_running_loop().time() > deadline:
                    raise
            await asyncio.sleep(0.5)

    async def _wait_no_learner(self, timeout: float = 60) -> list[dict[str, Any]]:
        """etcd admits one learner at a time: wait until the previous joiner has been promoted."""
        assert self.client is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            members = await self.client.member_list()
            if not any(m.get("isLearner") for m in members):
                return members
            if asyncio.get_running_loop().time() > deadline:
                raise errors.Conflict(
                    "another node is still catching up as a learner; retry the join in a minute "
                    "(or promote it with `minicloud cluster promote NODE`)"
                )
            await asyncio.sleep(0.5)

    async def _register_node(self, ctx: Context, state: ClusterState, zone: str) -> Written | None:
        spec = NodeSpec(address=state.address, role="voter", https=_url(state.address, self._https_port()))
        node = NODE.new(project="", name=self.name, spec=spec, labels={"zone": zone} if zone else {}, stamp=ctx.clock())
        try:
            return await commit(ctx, self.store, [Create(NODE.dump(node))], respond=lambda rev: None, label=NODE.label)
        except errors.AlreadyExists:  # registered by an earlier, interrupted enable
            return None

    def _https_port(self) -> int:
        listen = self.config.listen_address()
        info = self.config.data_path / "agent.json"
        with contextlib.suppress(OSError, ValueError, KeyError):
            return int(json.loads(info.read_text())["https"].rsplit(":", 1)[1])
        return listen[1] if listen else 8443

    # -- tokens and admission (on a member) ------------------------------------------------------------------------
    def _require_cluster(self) -> ClusterState:
        if self.state is None:
            raise errors.Conflict("this node is not in a cluster; run `minicloud cluster enable` first")
        return self.state

    async def issue_token(self, ctx: Context, node: str, role: str, ttl: int, zone: str = "") -> Written:
        """A one-time token for ``node`` to join with (201, :class:`JoinTokenIssued`). The cluster stores only the
        secret's hash; under an ``Idempotency-Key`` the reply (with the token) is stored sealed, like every reply."""
        state = self._require_cluster()
        if await self.store.get_by_name(NODE.name, "", node) is not None:
            raise errors.AlreadyExists(f"a node named {node} is already in the cluster; remove it first")
        addresses = [f"{state.address}:{self._https_port()}"]
        token, issued = joinlib.issue_token(addresses, self.pki.ca_fingerprint, node, ttl)
        spec = JoinTokenSpec(
            token_id=issued.token_id,
            node=issued.node,
            secret_sha256=issued.secret_sha256,
            issued_at=issued.issued_at,
            expires_at=issued.expires_at,
            role=role,
            zone=zone,
        )
        obj = JOINTOKEN.new(project="", id=issued.token_id, name=issued.token_id, spec=spec, stamp=ctx.clock())
        return await commit(
            ctx,
            self.store,
            [Create(JOINTOKEN.dump(obj))],
            status=201,
            label=JOINTOKEN.label,
            respond=lambda rev: JoinTokenIssued(token=token, node=node, expires_at=issued.expires_at),
        )

    async def admit(
        self,
        ctx: Context,
        token_text: str,
        csr_pem: str,
        node: str,
        client_time: str,
        peer_url: str,
        client_url: str,
        address: str,
        https: str = "",
    ) -> Written:
        """Check a join request, consume its token, sign the node's CSR and add it to etcd (the reply,
        :class:`JoinReply`, carries the cluster's keys: it is never stored, so no ``Idempotency-Key`` applies).
        ``https`` is the node's HTTPS URL; it must name ``address``."""
        state = self._require_cluster()
        _check_https(https, address)
        assert self.client is not None
        ctx = dataclasses.replace(ctx, idempotency=None)
        token = joinlib.parse_token(token_text)
        found = await self.store.get(JOINTOKEN.name, token.token_id)
        stored = JOINTOKEN.load(found) if found is not None else None
        record = None
        if stored is not None:
            s = stored.spec
            record = joinlib.JoinTokenRecord(
                token_id=s.token_id,
                node=s.node,
                secret_sha256=s.secret_sha256,
                issued_at=s.issued_at,
                expires_at=s.expires_at,
            )
        try:
            client_now = _dt.datetime.fromisoformat(client_time.replace("Z", "+00:00"))
        except ValueError:
            raise errors.ValidationFailed("client_time must be an RFC 3339 time") from None
        joinlib.verify_token(token, record, server_now=_now(), client_now=client_now, node_name=node)
        assert stored is not None
        role = stored.spec.role
        cert = joinlib.sign_node_csr(
            self.pki.ca_cert.read_bytes(), self.pki.ca_key.read_bytes(), csr_pem.encode(), node
        )
        members_now = await self._wait_no_learner()
        voters = [m for m in members_now if not m.get("isLearner")]
        if role == "auto":
            role = "voter" if len(voters) < 3 else "learner"
        zone = stored.spec.zone
        joined = NODE.new(
            project="",
            name=node,
            spec=NodeSpec(address=address, role=role, https=https),
            labels={"zone": zone} if zone else {},
            stamp=ctx.clock(),
        )
        try:  # one-time: consume the token and register the node together (audited), before etcd changes
            written = await commit(
                ctx,
                self.store,
                [
                    Create(NODE.dump(joined)),
                    Delete(kind=JOINTOKEN.name, id=stored.id, expect_revision=stored.revision),
                ],
                label=NODE.label,
                respond=lambda rev: None,
            )
        except errors.AlreadyExists:
            raise errors.AlreadyExists(f"a node named {node} is already in the cluster") from None
        except (errors.NotFound, errors.PreconditionFailed, errors.Conflict):  # consumed by a concurrent join
            raise joinlib.JoinTokenInvalid("the join token is not valid (unknown or already used)") from None
        # Every new member starts as a learner: it cannot cost the cluster its quorum while it catches up. The new
        # node promotes itself once etcd accepts it as in sync, when its role is voter.
        try:
            added = await self._member_add(peer_url)
        except EtcdError as exc:
            # Undo: the node is not a member, and the operator may retry with the same token.
            restored = JOINTOKEN.dump(stored.replace(updated_at=ctx.clock()))
            undo = [Delete(kind=NODE.name, id=joined.id), Create(restored)]
            with contextlib.suppress(errors.MinicloudError):
                await commit(Context.system("cluster"), self.store, undo, respond=lambda rev: None, label=NODE.label)
            raise errors.Unavailable(f"etcd could not add {node} as a member: {exc}; retry the join") from None
        members = added.get("members", [])
        initial = {}
        for m in members:
            urls = m.get("peerURLs", [])
            if urls:
                initial[m.get("name") or node] = urls[0]
        endpoints = sorted({u for m in members for u in m.get("clientURLs", [])} | set(state.endpoints))
        reply = JoinReply(
            certificate=cert.decode(),
            ca_certificate=self.pki.ca_cert.read_text(),
            ca_key=self.pki.ca_key.read_text(),
            # Every node signs and checks session tokens with the same key, so a session works on any node.
            session_key=(self.config.data_path / "pki" / "session.key").read_text(),
            # ... and decrypts secrets at rest (S3 access keys) with the same key store.
            keystore=KeyStore(self.config.data_path / "keys").export(),
            initial_cluster=initial,
            endpoints=endpoints,
            role=role,
        )
        return dataclasses.replace(written, body=reply)

    # -- join (on the new node) ------------------------------------------------------------------------------------
    async def join(self, token_text: str) -> ClusterState:
        async with self._lock:
            if self.state is not None:
                raise errors.Conflict("this node is already in a cluster")
            token = joinlib.parse_token(token_text)
            if token.node != self.name:
                raise joinlib.JoinTokenWrongNode(
                    f"this token is for node '{token.node}', but this node is '{self.name}'; "
                    f"create one for it with `minicloud cluster add {self.name}`"
                )
            address = advertise_address(self.config)
            c = self.config.cluster
            peer_url, client_url = _url(address, c.etcd_peer_port), _url(address, c.etcd_client_port)
            key_pem, csr_pem = joinlib.make_node_key_and_csr(self.name, [address])
            https = _url(address, self._https_port()) if self.config.listen_address() else ""
            reply = await self._send_join(token, csr_pem.decode(), peer_url, client_url, address, https)
            # Install the cluster's CA and this node's certificate, then make HTTPS serve it.
            _atomic_write(self.pki.ca_key, reply["ca_key"].encode())
            _atomic_write(self.config.data_path / "pki" / "session.key", reply["session_key"].encode())
            if self.on_session_key is not None:
                self.on_session_key(reply["session_key"].encode())
            if self.on_keystore is not None:
                self.on_keystore(reply["keystore"])
            _atomic_write(self.pki.ca_cert, reply["ca_certificate"].encode())
            _atomic_write(self.pki.server_key, key_pem)
            _atomic_write(self.pki.server_cert, reply["certificate"].encode() + reply["ca_certificate"].encode())
            if self.https_ssl is not None:
                self.https_ssl.load_cert_chain(self.pki.server_cert, self.pki.server_key)
                self.https_ssl.load_verify_locations(cafile=str(self.pki.ca_cert))  # other nodes' client certificates
            state = ClusterState(
                node=self.name,
                address=address,
                client_url=client_url,
                peer_url=peer_url,
                endpoints=reply["endpoints"],
                initial_cluster=reply["initial_cluster"],
                initial_state="existing",
                role=reply["role"],
            )
            shutil.rmtree(self.config.data_path / "etcd", ignore_errors=True)
            member = EtcdMember(self._member_config(state))
            await member.spawn()
            client = self._etcd_client(state.endpoints)

            async def change() -> EtcdStore:
                backend = EtcdStore(self.store.local, client)
                await backend.open()
                return backend

            await self.store.switch(change)
            self.member, self.client = member, client
            self._save_state(state)
            if state.role == "voter":
                self._tasks.append(asyncio.create_task(self._promote_self(), name="cluster-promote"))
            self._start_loops()
            log.info("joined the cluster", extra={"node": self.name, "endpoints": state.endpoints})
            return state

    async def _send_join(
        self, token: joinlib.JoinToken, csr: str, peer_url: str, client_url: str, address: str, https: str
    ) -> dict[str, Any]:
        errors_seen = []
        for target in token.addresses:
            base = f"https://{target}"
            try:
                async with aiohttp.ClientSession() as http:
                    insecure = ssl.create_default_context()
                    insecure.check_hostname = False
                    insecure.verify_mode = ssl.CERT_NONE
                    async with http.get(f"{base}/v1/ca", ssl=insecure, timeout=aiohttp.ClientTimeout(total=10)) as r:
                        ca_pem = (await r.json())["pem"]
                    joinlib.check_ca(token, ca_pem)
                    pinned = ssl.create_default_context(cadata=ca_pem)
                    pinned.check_hostname = False
                    body = {
                        "token": joinlib.encode_token(token),
                        "csr": csr,
                        "node": self.name,
                        "client_time": ids.now(),
                        "peer_url": peer_url,
                        "client_url": client_url,
                        "address": address,
                        "https": https,
                    }
                    async with http.post(
                        f"{base}/v1/cluster/join-requests",
                        json=body,
                        ssl=pinned,
                        timeout=aiohttp.ClientTimeout(total=60),
                    ) as r:
                        data = await r.json(content_type=None)
                        if r.status >= 400:
                            raise _remote_problem(r.status, data)
                        return data
            except (aiohttp.ClientError, TimeoutError, OSError, KeyError, ValueError) as exc:
                errors_seen.append(f"{target}: {exc}")
        raise errors.Unavailable("could not reach the cluster at " + "; ".join(errors_seen))

    async def _promote_self(self, timeout: float = 120) -> None:
        """Ask etcd to make this learner a voter, retrying until it has caught up with the leader."""
        assert self.client is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            try:
                me = next((m for m in await self.client.member_list() if m.get("name") == self.name), None)
                if me is not None and not me.get("isLearner"):
                    return
                if me is not None:
                    await self.client.member_promote(int(me["ID"]))
                    log.info("promoted to voter", extra={"node": self.name})
                    return
            except EtcdError as exc:
                log.debug("promotion not yet possible", extra={"error": str(exc)})
            await asyncio.sleep(TICK)
        log.warning("could not promote this node to voter; run `minicloud cluster promote %s`", self.name)

    async def promote(self, node: str) -> None:
        """Make a learner a voter (the operator's `cluster promote`)."""
        self._require_cluster()
        assert self.client is not None
        member = next((m for m in await self.client.member_list() if m.get("name") == node), None)
        if member is None:
            raise errors.NotFound(f"no etcd member named {node}; see `minicloud cluster list`")
        if not member.get("isLearner"):
            return
        try:
            await self.client.member_promote(int(member["ID"]))
        except EtcdError as exc:
            raise errors.Conflict(f"etcd refused to promote {node}: {exc}; retry once it has caught up") from None

    async def remove(self, ctx: Context, node: str) -> Written | None:
        """Remove a (typically dead) node: its etcd membership, heartbeat and node record (the record's delete is
        the audited write; None when there was no record, only an etcd member)."""
        self._require_cluster()
        assert self.client is not None
        if node == self.name:
            raise errors.Conflict("a node cannot remove itself; run `minicloud cluster remove` on another node")
        record = await self.store.get_by_name(NODE.name, "", node)
        member = next((m for m in await self.client.member_list() if m.get("name") == node), None)
        if record is None and member is None:
            raise errors.NotFound(f"no node named {node} in the cluster; see `minicloud cluster list`")
        if member is not None:
            await self.client.member_remove(int(member["ID"]))
        with contextlib.suppress(EtcdError):
            await self.client.delete(LIVE + node.encode())
        if record is None:
            return None
        ops = [Delete(kind=NODE.name, id=record.id, expect_revision=record.revision)]
        try:
            return await commit(ctx, self.store, ops, status=204, respond=lambda rev: None, label=NODE.label)
        except errors.NotFound:  # removed meanwhile (a concurrent remove): gone either way
            return None

    async def recover(self, ctx: Context) -> Written | None:
        """After losing quorum for good: make this node's etcd member a one-member cluster from its own data
        (``--force-new-cluster``) and forget the other members. Run it on the most up-to-date survivor; the others
        rejoin afterwards with fresh data directories (`cluster add` + `join`)."""
        state = self._require_cluster()
        assert self.client is not None and self.member is not None
        if await self.quorum_ok():
            raise errors.Conflict(
                "the cluster has a quorum; `cluster recover` is only for when it is lost for good. "
                "Remove dead nodes with `minicloud cluster remove NODE` instead"
            )
        async with self._lock:
            await self.member.stop()
            forced = EtcdMember(dataclasses.replace(self._member_config(state), force_new_cluster=True))
            try:
                await forced.start()
            except BaseException:
                await forced.stop()
                await self.member.spawn()  # leave the node as it was
                raise
            await forced.stop()
            state.initial_cluster = {self.name: state.peer_url}
            state.endpoints = [state.client_url]
            self._save_state(state)
            self.client.set_endpoints(state.endpoints)
            self.member = EtcdMember(self._member_config(state))
            await self.member.start()
        backend = self.store.backend
        if isinstance(backend, EtcdStore):
            await backend.check_quorum()
        gone = [r for r in await self.store.list(NODE.name, limit=1000) if r.name != self.name]
        written = None
        if gone:
            deletes = [Delete(kind=NODE.name, id=r.id) for r in gone]
            written = await commit(ctx, self.store, deletes, respond=lambda rev: None, label=NODE.label)
        for record in gone:
            with contextlib.suppress(EtcdError):
                await self.client.delete(LIVE + record.name.encode())
        log.warning(
            "cluster recovered as a one-member cluster", extra={"node": self.name, "removed": [r.name for r in gone]}
        )
        return written

    # -- loops -----------------------------------------------------------------------------------------------------
    def _start_loops(self) -> None:
        self._tasks += [
            asyncio.create_task(self._heartbeat_loop(), name="cluster-heartbeat"),
            asyncio.create_task(self._leader_loop(), name="cluster-leader"),
        ]

    async def _heartbeat_loop(self) -> None:
        assert self.client is not None and self.state is not None
        lease = 0
        backend = self.store.backend
        while True:
            try:
                if not lease:
                    lease = await self.client.lease_grant(HEARTBEAT_TTL)
                    value = json.dumps({"address": self.state.address, "since": ids.now()}).encode()
                    await self.client.put(LIVE + self.name.encode(), value, lease=lease)
                elif await self.client.lease_keepalive(lease) <= 0:
                    lease = 0
                    continue
                if isinstance(backend, EtcdStore):
                    backend._touch()
                await self._refresh_endpoints()
            except EtcdError as exc:
                log.debug("heartbeat failed", extra={"error": str(exc)})
                lease = 0 if "not found" in str(exc) else lease
            await asyncio.sleep(TICK)

    async def _refresh_endpoints(self) -> None:
        assert self.client is not None and self.state is not None
        members = await self.client.member_list()
        endpoints = sorted({u for m in members for u in m.get("clientURLs", [])})
        if endpoints and endpoints != sorted(self.state.endpoints):
            self.client.set_endpoints([self.state.client_url] + [e for e in endpoints if e != self.state.client_url])
            self.state.endpoints = endpoints
            self._save_state(self.state)

    async def _set_leader(self, leader: str | None) -> None:
        was = self.is_leader
        self.leader = leader
        self.is_leader = leader == self.name
        if was != self.is_leader:
            log.info("services leadership", extra={"leader": leader, "this_node": self.is_leader})

    async def _leader_loop(self) -> None:
        """Hold the cluster-services leadership while this node's etcd member leads Raft.

        Following the Raft leader keeps the leader-only loops next to the member that commits their writes, and
        means one failure moves both leaderships together. The leadership itself is a key on a lease: a holder that
        dies loses it within ``LEADER_TTL`` seconds, one that stops leading Raft gives it up at once.
        """
        assert self.client is not None
        while True:
            try:
                raft_leader = await self.etcd_leader()
                if self.is_leader:
                    alive = await self.client.lease_keepalive(self._leader_lease) > 0
                    if not alive or (raft_leader is not None and raft_leader != self.name):
                        await self.client.lease_revoke(self._leader_lease)
                        await self._set_leader(None)
                elif raft_leader == self.name:
                    lease = await self.client.lease_grant(LEADER_TTL)
                    ok, _, _ = await self.client.txn(
                        [cmp_create(LEADER, 0)], [op_put(LEADER, self.name.encode(), lease=lease)]
                    )
                    if ok:
                        self._leader_lease = lease
                        await self._set_leader(self.name)
                    else:
                        await self.client.lease_revoke(lease)
                if not self.is_leader:
                    kv = await self.client.get(LEADER)
                    await self._set_leader(kv.value.decode() if kv else None)
                else:
                    await self.track_liveness()
                    self._schedule_storage_maintenance()
            except EtcdError:
                if self.is_leader:
                    await self._set_leader(None)
            await asyncio.sleep(TICK / 2)

    # -- etcd storage ----------------------------------------------------------------------------------------------
    def _schedule_storage_maintenance(self) -> None:
        """Leader duty, every ``STORAGE_EVERY`` seconds: in its own task, so a long defragmentation never delays
        the leadership's lease renewals."""
        now = asyncio.get_running_loop().time()
        running = self._storage_task is not None and not self._storage_task.done()
        if running or now < self._storage_due:
            return
        self._storage_due = now + STORAGE_EVERY
        self._storage_task = asyncio.create_task(self.maintain_storage(), name="etcd-storage")
        self._tasks.append(self._storage_task)
        self._tasks = [t for t in self._tasks if not t.done() or t is self._storage_task]

    async def _member_storage(self) -> list[tuple[dict[str, Any], dict[str, Any] | None]]:
        assert self.client is not None
        out: list[tuple[dict[str, Any], dict[str, Any] | None]] = []
        for m in await self.client.member_list():
            urls = m.get("clientURLs") or []
            status = None
            if urls:
                with contextlib.suppress(EtcdError, aiohttp.ClientError, OSError, TimeoutError, ValueError):
                    status = await self.client.status(urls[0])
            out.append((m, status))
        return out

    async def storage(self) -> list[EtcdStorage]:
        """Each etcd member's database size against the quota, its alarms and a warning when it needs attention."""
        self._require_cluster()
        assert self.client is not None
        try:
            alarms = await self.client.alarms()
            members = await self._member_storage()
        except EtcdError:
            return []
        quota = self.config.cluster.etcd_quota_bytes
        out = []
        for m, status in members:
            mid = int(m.get("ID", 0))
            name = m.get("name") or str(mid)
            raised = [a for member_id, a in alarms if member_id == mid]
            if status is None:
                out.append(storage_mod.assess(name, 0, 0, quota, raised))
                continue
            size, in_use = int(status.get("dbSize", 0)), int(status.get("dbSizeInUse", 0) or status.get("dbSize", 0))
            out.append(storage_mod.assess(name, size, in_use, int(status.get("dbSizeQuota", 0)) or quota, raised))
        return out

    async def maintain_storage(self) -> None:
        """Leader duty: defragment members whose file is mostly free pages, one at a time, then disarm a NOSPACE
        alarm once the database is back under the warning level. Errors are logged; the next round retries."""
        assert self.client is not None
        try:
            quota = self.config.cluster.etcd_quota_bytes
            for m, status in await self._member_storage():
                if status is None or not m.get("clientURLs"):
                    continue
                size, in_use = int(status.get("dbSize", 0)), int(status.get("dbSizeInUse", 0) or 0)
                if in_use and storage_mod.needs_defrag(size, in_use):
                    log.info("defragmenting etcd", extra={"member": m.get("name"), "db_size": size, "in_use": in_use})
                    await self.client.defragment(m["clientURLs"][0])
            for member_id, alarm in await self.client.alarms():
                if alarm != "NOSPACE":
                    continue
                member = next((m for m, _ in await self._member_storage() if int(m.get("ID", 0)) == member_id), None)
                urls = (member or {}).get("clientURLs") or []
                size = int((await self.client.status(urls[0])).get("dbSize", 0)) if urls else 0
                if urls and storage_mod.may_disarm(size, quota):
                    await self.client.alarm_disarm(member_id)
                    log.warning("etcd NOSPACE alarm disarmed", extra={"member": member_id, "db_size": size})
        except (EtcdError, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            log.warning("etcd storage maintenance failed; retrying next round", extra={"error": str(exc)})

    # -- views -----------------------------------------------------------------------------------------------------
    async def _live(self) -> dict[str, dict[str, Any]]:
        assert self.client is not None
        kvs, _, _ = await self.client.range(LIVE, prefix_end(LIVE))
        return {kv.key[len(LIVE) :].decode(): json.loads(kv.value) for kv in kvs}

    async def track_liveness(self) -> None:
        """Leader duty: record each node's online/offline transitions with the time of last contact in its node
        record (one write per transition, not per heartbeat), so `cluster list` can say since when a node is gone."""
        live = await self._live()
        stamp = ids.now()
        ops = []
        for record in await self.store.list(NODE.name, limit=1000):
            node = NODE.load(record)
            state = node.status.state
            if node.name in live and state != "online":
                status = NodeStatus(state="online", since=live[node.name].get("since"), last_contact=None)
            elif node.name not in live and state != "offline":
                # Its heartbeat lease just expired: the last renewal was about one lease TTL ago.
                last = (_now() - _dt.timedelta(seconds=HEARTBEAT_TTL)).isoformat(timespec="milliseconds")
                status = NodeStatus(state="offline", since=None, last_contact=last.replace("+00:00", "Z"))
            else:
                continue
            # A status write of the leader's own observation (like a reconciler's): compare-and-swap, not audited.
            ops.append(Update(NODE.dump(node.replace(status=status, updated_at=stamp)), expect_revision=node.revision))
        if ops:
            with contextlib.suppress(TxnFailed):
                await self.store.commit(Txn(ops))
        await self._replace_lost_voters(live)

    async def _replace_lost_voters(self, live: dict[str, Any]) -> None:
        """Leader duty: when a voter has been offline for PROMOTE_AFTER seconds and a learner is online, promote
        the learner, so that one more failure does not cost the quorum. The dead voter stays a member (and counts
        towards the quorum) until an operator removes it with `cluster remove`."""
        assert self.client is not None
        members = await self.client.member_list()
        now = asyncio.get_running_loop().time()
        down = [m.get("name", "") for m in members if not m.get("isLearner") and m.get("name", "") not in live]
        self._voter_down_since = {n: self._voter_down_since.get(n, now) for n in down}
        if not any(now - since >= PROMOTE_AFTER for since in self._voter_down_since.values()):
            return
        learner = next((m for m in members if m.get("isLearner") and m.get("name", "") in live), None)
        if learner is None:
            return
        try:
            await self.client.member_promote(int(learner["ID"]))
        except EtcdError as exc:
            log.info("could not promote a learner yet", extra={"learner": learner.get("name"), "error": str(exc)})
            return
        self._voter_down_since.clear()
        log.warning(
            "promoted a learner to replace an unreachable voter",
            extra={"learner": learner.get("name"), "down": down},
        )

    async def members(self) -> list[ClusterMember]:
        """Every node with its role, liveness and last contact, as etcd sees it now."""
        self._require_cluster()
        assert self.client is not None
        live: dict[str, dict[str, Any]] = {}
        etcd_members: dict[str, dict[str, Any]] = {}
        with contextlib.suppress(EtcdError):
            live = await self._live()
            etcd_members = {m.get("name", ""): m for m in await self.client.member_list()}
        out = []
        for record in await self.store.list(NODE.name, limit=1000):
            node = NODE.load(record)
            m = etcd_members.get(node.name, {})
            out.append(
                ClusterMember(
                    name=node.name,
                    address=node.spec.address,
                    zone=node.labels.get("zone", ""),
                    # etcd's membership is the truth once the node is a member; the record says what was asked for.
                    role=("learner" if m.get("isLearner") else "voter") if m else node.spec.role,
                    status="online" if node.name in live else "offline",
                    online_since=live.get(node.name, {}).get("since"),
                    last_contact=ids.now() if node.name in live else node.status.last_contact,
                    etcd_member_id=str(m.get("ID", "")),
                    leader=node.name == self.leader,
                )
            )
        return out

    async def etcd_leader(self) -> str | None:
        """The name of the etcd member that leads Raft now, as this node's etcd member sees it."""
        if self.client is None or self.state is None:
            return None
        try:
            status = await self.client.status(self.state.client_url)
            leader = int(status.get("leader", 0))
            members = await self.client.member_list()
        except (EtcdError, aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return None
        return next((m.get("name") for m in members if int(m.get("ID", 0)) == leader and leader), None)

    async def quorum_ok(self) -> bool:
        backend = self.store.backend
        return await backend.check_quorum() if isinstance(backend, EtcdStore) else True


def _remote_problem(status: int, data: Any) -> errors.MinicloudError:
    detail = data.get("detail") if isinstance(data, dict) else str(data)
    err = errors.MinicloudError(f"the cluster refused the join: {detail}")
    err.status = status  # type: ignore[misc]
    err.slug = data.get("type", "").rsplit("/", 1)[-1] if isinstance(data, dict) else "join-refused"  # type: ignore[misc]
    return err
