"""The storage reconciler: runs this node's part of the Ceph cluster and its volume drivers from the records.

It runs on the framework (:mod:`agent.reconcile`), one key per record, plus two node-wide keys:

- :data:`ENGINE_KEY` (the ``cephcluster`` record): on the bootstrap node, while the record has no keys, bootstrap
  the first MON and MGR (:meth:`CephEngine.bootstrap`), create the ``client.minicloud`` key guests and drivers use
  (RBD on the record's pools only), seal every key with the node key store (associated data: the entity name) and
  write them into the record (compare-and-swap). Every node (this one after a restart too) installs the keys from the
  record (``ceph.conf``, keyrings) and publishes the cephx secret in :class:`~agent.storage.node.NodeStorage`; then
  :meth:`CephEngine.ensure_running` restarts whichever of this node's daemons is not running — **supervision**:
  the key is looked at again every :data:`SUPERVISE` seconds. A node the record's ``mons`` names (the services
  leader writes them: :mod:`minicloud.storage.mons`) makes its MON, which joins the quorum, and a standby MGR
  (:meth:`CephEngine.add_mon`); one no longer named takes its MON out (:meth:`CephEngine.remove_mon`). One node
  *leads* (the bootstrap node, or the first MON node by name that is not offline): it ensures the record's RADOS
  pools and the key's caps on them, keeps the replica count at ``min(3, hosts whose OSDs are in)``, takes the MONs
  of lost nodes the record no longer names out of the monmap, and writes the record's status from
  :meth:`CephEngine.status`
  (``ready`` once every PG is active+clean; a write only when something but the time changed, or each minute).
- **disks** (``storagedisk`` of this node): create the OSD once and record its id; ``remove``: drain and purge it,
  then delete the record. Crash-safe without two OSDs for one disk: an *intent* file
  (``<data_dir>/storage/osd-disks/<disk id>.json``, the OSD ids this node had before) is written before the OSD is
  made and replaced by the OSD's id after, so a disk whose OSD was made but not recorded finds it again (the one new
  OSD of this node no other disk claims). OSD creations on a node are serialised for that reason.
- **pools** (every ``pool``): make its :class:`~agent.storage.driver.VolumeDriver` (``ceph``: RBD as
  ``client.minicloud``, once this node has the keys; ``local``: qcow2 files under ``<data_dir>/storage/<pool id>``)
  and publish it in ``NodeStorage``; withdraw it when the record goes.
- **volumes** (``spec.node`` = this node): fencing first (a ``previous_node`` that is lost — removed, or offline for
  :data:`FENCE_GRACE` — is blocklisted before anything writes the volume, then the field is cleared), then delete
  (``spec.deleted``: the data with its snapshots, then the record), create (blank, a clone of the image's ``base`` snapshot, a clone of a snapshot),
  grow (``size_gib`` above what the pool holds; the compute reconciler makes an attached guest see it), revert
  (``revert.seq`` above ``status.revert_seq``, only while detached), flatten (``spec.flatten`` without
  ``status.flattened``: :meth:`VolumeDriver.flatten`, then :func:`minicloud.storage.volumes.flattened` releases
  the snapshot). ``creating → available``; the attachment
  states (``attaching``, ``in-use``, ``detaching``) are the compute reconciler's and left alone.
- **snapshots** (``spec.node`` = this node): take it, or delete it (``InUse`` while clones depend on it: ``error``
  naming them) and then its record.
- **images** (``spec.pool`` set, ``spec.node`` = this node, not ``ready`` in the pool): import the disk file into the
  pool (``importing → ready``) and protect its ``base`` snapshot (what clones start from).
- :data:`NODE_KEY`: sweep pool copies of images and volumes no record names (a record deleted while this node was
  down): this node's local pools, and the ceph pools on the leading node; and the temporary leftovers
  (``….part``) of imports a crash interrupted, when no record names them or nothing wrote them for :data:`PART_IDLE`. ``<instance>-root`` disks are the compute
  reconciler's and never touched here.

Every step is idempotent and the reconcile level-triggered: a crash between two steps (the fault points
``storage.*`` of :mod:`agent.faults`) converges on the next pass. What a driver refuses goes into the record's status
(and is tried again every :data:`ERROR_RETRY` seconds); store errors propagate and the framework retries.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as _dt
import ipaddress
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec

from agent import faults
from agent.process import write_private
from agent.reconcile import Result, update_record
from agent.storage.driver import InUse, StorageError, VolumeDriver, make_volume_driver
from agent.storage.node import CephSecret, NodeStorage
from minicloud import errors, ids
from minicloud.cluster.kinds import NODE
from minicloud.compute.kinds import IMAGE, INSTANCE
from minicloud.config import Config
from minicloud.core.context import Context
from minicloud.core.kinds import Kind
from minicloud.model.storage import OsdInfo
from minicloud.state import Change, Delete, Record, Store, Txn, TxnFailed, list_all
from minicloud.storage.kinds import (
    CEPH,
    CEPH_NAME,
    DEFAULT_CEPH_POOL,
    GIB,
    POOL,
    SNAPSHOT,
    STORAGE_DISK,
    VOLUME,
    CephSpec,
    Fence,
    rbd_image,
)
from minicloud.storage.snapshots import forget_root_snapshot
from minicloud.storage.volumes import flattened

log = logging.getLogger("minicloud.storage.node")

#: The key of the ``cephcluster`` record (there is one, found by name).
ENGINE_KEY = ":ceph"
#: The node-wide sweep of pool contents no record names.
NODE_KEY = ":node"
#: Seconds between two looks at this node's Ceph daemons (supervision) and the cluster's status.
SUPERVISE = 10.0
#: How soon to look again while waiting for something no record announces (a pool's driver, a detach).
RETRY = 5.0
#: How soon a record whose last step the driver refused is tried again.
ERROR_RETRY = 30.0
#: How often a root-disk snapshot is looked at again (its instance's delete removes its data: the record goes).
ROOT_SNAPSHOT_CHECK = 60.0
#: How often a leading node rewrites an unchanged cluster status (``observed_at``).
STATUS_REFRESH = 60.0
#: How often a disk's up/down state is looked at.
DISK_REFRESH = 30.0
#: The cephx identity of guests and volume drivers, limited to RBD on the record's pools.
CLIENT = "client.minicloud"
CLIENT_USER = CLIENT.removeprefix("client.")
#: Temporary import leftovers (``….part``) nothing has written for this long are removed by the sweep, even when
#: their record exists (an import in progress writes; one interrupted is started afresh when retried).
PART_IDLE = 3600.0
#: How long a lost node stays fenced (``ceph osd blocklist add`` expiry): as good as for ever — the fence is lifted
#: by the node itself once it is back and its stale guests are gone (:meth:`StorageReconciler._unfence`), not by
#: a clock (the engine's default hour would let a half-dead node that lives longer write a moved volume again).
FENCE_SECONDS = 10 * 365 * 24 * 3600
#: A node offline for less than this (since its last contact) is not fenced yet: a missed heartbeat (the lease is
#: 5 s) is not a lost node, and a fence cuts every Ceph client of the node, its running guests' disks included.
FENCE_GRACE = 30.0
#: The transient volume states this reconciler sets (the others belong to the compute reconciler and the services).
_MINE = frozenset({"creating", "extending", "reverting", "error"})


class _Refused(Exception):
    """A step cannot be done for a reason the record's status should say."""


def _ip(address: str) -> str:
    """The IP of a node record's or MON's address (``IP`` or ``IP:port``); the text itself when it is neither."""
    text = address.strip()
    for candidate in (text, text.rsplit(":", 1)[0].strip("[]")):
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_address(candidate))
    return text


def _gib(size_bytes: int | None) -> int:
    return 0 if not size_bytes else -(-size_bytes // GIB)


def _osd_info(osd: Any) -> OsdInfo:
    """The record's view of one of the engine's OSDs."""
    fields = msgspec.to_builtins(osd)
    if "in" in fields:
        fields["in_cluster"] = fields.pop("in")
    return OsdInfo(**{k: v for k, v in fields.items() if k in OsdInfo.__struct_fields__})


def _read_key(path: Path, entity: str) -> str | None:
    """The key of ``entity`` in keyring file ``path``, or None."""
    try:
        text = path.read_text()
    except OSError:
        return None
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == entity and line.startswith("key") and "=" in line:
            return line.split("=", 1)[1].strip()
    return None


def real_engine_factory(config: Config) -> Callable[..., Any]:
    """What makes a :class:`agent.storage.ceph.CephEngine` from :class:`CephSettings` keywords (``root, fsid, node,
    address, mon_hosts``), with the ports of ``config``'s ``[storage]``."""

    def make(**settings: Any) -> Any:
        from agent.storage.ceph import CephEngine, CephSettings

        cfg = config.storage
        return CephEngine(
            CephSettings(
                **settings,
                mon_port=cfg.ceph_mon_port,
                mon_port_v1=cfg.ceph_mon_port_v1,
                prometheus_port=cfg.ceph_prometheus_port,
                osd_memory_target=cfg.ceph_osd_memory_target,
            )
        )

    return make


@dataclasses.dataclass
class _EngineState:
    """This process's view of its engine: rebuilt when the cluster's identity or MONs change."""

    signature: tuple[Any, ...]
    engine: Any
    installed: tuple[str, ...] = ()  # the sealed keys last installed
    mon_placed: bool = False  # this node's MON was found at the record's address (no re-address to look for)


class StorageReconciler:
    """See the module docstring. Construct it, then run it with ``Controller(store, reconciler).start()``."""

    name = "storage"
    kinds = frozenset({CEPH.name, STORAGE_DISK.name, POOL.name, VOLUME.name, SNAPSHOT.name, IMAGE.name})

    def __init__(
        self,
        *,
        store: Store,
        config: Config,
        storage: NodeStorage,
        keystore: Any,
        engine_factory: Callable[..., Any] | None = None,
        driver_factory: Callable[..., VolumeDriver] = make_volume_driver,
    ) -> None:
        self.store = store
        self.config = config
        self.node = config.node_name
        self.storage = storage
        self.keystore = keystore
        self.engine_factory = engine_factory or real_engine_factory(config)
        self.driver_factory = driver_factory
        self.images_dir = config.data_path / "images"
        self.storage_dir = config.data_path / "storage"
        self.ceph_root = config.data_path / "ceph"
        self.intents_dir = self.storage_dir / "osd-disks"
        self._enqueue: Callable[[str], None] = lambda key: None
        self._engine: _EngineState | None = None
        #: This node has the cluster's keys installed (ceph.conf + keyrings): RBD clients work here.
        self._keys_ready = False
        self._leading = False
        self._replicas: int | None = None
        self._caps_pools: tuple[str, ...] | None = None
        self._pools_ensured: tuple[int, tuple[str, ...]] | None = None
        self._status_written = 0.0
        #: pool id → (settings, driver) of the drivers made, so a resync does not replace an unchanged one.
        self._drivers: dict[str, tuple[tuple[Any, ...], VolumeDriver]] = {}
        #: keys waiting for a pool's driver, by pool id.
        self._waiting: dict[str, set[str]] = {}
        self._osd_lock = asyncio.Lock()
        self._image_tried: dict[str, float] = {}
        #: This node's address from its ``node`` record ("" on a single node without one).
        self._my_address = ""
        #: This node's zone (its ``node`` record's ``zone`` label): its CRUSH host's zone.
        self._my_zone = ""
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the framework's side --------------------------------------------------------------------------------------
    async def start(self, enqueue: Callable[[str], None]) -> None:
        self._enqueue = enqueue
        self.storage.on_change(self._pool_changed)

    async def close(self) -> None:
        """The Ceph daemons outlive the agent on purpose (a restarted agent adopts them): only our tasks stop."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def keys_for(self, change: Change) -> Iterable[str]:
        kind = change.kind
        if kind == CEPH.name:
            return [ENGINE_KEY]
        if kind == POOL.name:
            return [change.id]
        if change.type == "deleted":
            # A deleted image (or volume) may leave a pool copy to sweep; the rest was removed by its node.
            return [NODE_KEY] if kind in (IMAGE.name, VOLUME.name) else []
        spec_node = change.record.spec.get("node") if isinstance(change.record.spec, dict) else None
        if kind == IMAGE.name and not change.record.spec.get("pool"):
            return []
        return [change.id] if spec_node == self.node else []

    async def all_keys(self) -> list[str]:
        keys = [ENGINE_KEY, NODE_KEY]
        keys += [r.id for r in await list_all(self.store, POOL.name)]
        for kind in (STORAGE_DISK, VOLUME, SNAPSHOT):
            keys += [r.id for r in await list_all(self.store, kind.name, where={"node": self.node})]
        keys += [r.id for r in await list_all(self.store, IMAGE.name, where={"node": self.node}) if r.spec.get("pool")]
        return keys

    async def reconcile(self, key: str) -> Result:
        if key == ENGINE_KEY:
            return await self._reconcile_engine()
        if key == NODE_KEY:
            return await self._sweep()
        prefix = key.split("-", 1)[0]
        if prefix == POOL.prefix:
            return await self._reconcile_pool(key)
        if prefix == STORAGE_DISK.prefix:
            return await self._reconcile_disk(key)
        if prefix == VOLUME.prefix:
            return await self._guarded(VOLUME, key, self._reconcile_volume)
        if prefix == SNAPSHOT.prefix:
            return await self._guarded(SNAPSHOT, key, self._reconcile_snapshot)
        if prefix == IMAGE.prefix:
            return await self._reconcile_image(key)
        return Result()

    def _pool_changed(self, pool_id: str) -> None:
        for key in self._waiting.pop(pool_id, set()):
            self._enqueue(key)

    def _wait_for_pool(self, pool_id: str, key: str) -> Result:
        self._waiting.setdefault(pool_id, set()).add(key)
        return Result(requeue_after=RETRY)

    async def _guarded(self, kind: Kind[Any, Any], key: str, step: Callable[[Any], Any]) -> Result:
        """Run ``step(record)`` for a volume or snapshot; what the driver refuses becomes its ``error`` status."""
        record = await self.store.get(kind.name, key)
        if record is None:
            return Result()
        obj = kind.load(record)
        if obj.spec.node != self.node:
            return Result()
        try:
            return await step(obj)
        except (asyncio.CancelledError, TxnFailed, errors.MinicloudError):
            raise
        except _Waiting:
            return Result(requeue_after=RETRY)
        except (StorageError, _Refused) as exc:
            log.warning("storage step failed", extra={"kind": kind.name, "id": key, "error": str(exc)})
            await self._set_status(kind, key, state="error", reason=str(exc))
        except Exception as exc:
            log.exception("converging a storage record failed", extra={"kind": kind.name, "id": key})
            reason = f"internal error ({type(exc).__name__}); see the agent log on node {self.node}"
            await self._set_status(kind, key, state="error", reason=reason)
        return Result(requeue_after=ERROR_RETRY)

    # -- the engine --------------------------------------------------------------------------------------------------
    def _engine_for(self, ceph: Any) -> Any:
        spec: CephSpec = ceph.spec
        mons = {n: _ip(a) for n, a in spec.mons.items()}
        address = mons.get(self.node) or self._my_address or "127.0.0.1"
        signature = (spec.fsid, tuple(sorted(mons.items())), address, self._my_zone)
        if self._engine is None or self._engine.signature != signature:
            engine = self.engine_factory(
                root=self.ceph_root, fsid=spec.fsid, node=self.node, address=address, mon_hosts=mons,
                zone=self._my_zone,
            )  # fmt: skip
            self._engine = _EngineState(signature=signature, engine=engine)
            self._drivers = {k: v for k, v in self._drivers.items() if v[1].name != "ceph"}
        return self._engine.engine

    async def _learn_address(self) -> None:
        record = await self.store.get_by_name(NODE.name, "", self.node)
        node = NODE.load(record) if record is not None else None
        self._my_address = _ip(node.spec.address) if node is not None else ""
        self._my_zone = node.labels.get("zone", "") if node is not None else ""

    async def _reconcile_engine(self) -> Result:
        record = await self.store.get_by_name(CEPH.name, "", CEPH_NAME)
        if record is None:
            self._set_keys_ready(False)
            return Result()
        ceph = CEPH.load(record)
        await self._learn_address()
        engine = self._engine_for(ceph)
        from agent.storage.ceph import CephError

        sealed = ceph.spec.keys
        try:
            if not sealed:
                if ceph.spec.bootstrap_node != self.node:
                    return Result()  # the bootstrap node writes them; that change queues this key again
                sealed = await self._bootstrap(ceph, engine)
            await self._install(ceph, engine, sealed)
        except (CephError, StorageError, errors.MinicloudError) as exc:
            # A key that does not decrypt (errors.MinicloudError: the key store) is an operator problem too.
            log.error("this node cannot join the storage cluster", extra={"error": str(exc)})
            if ceph.spec.bootstrap_node == self.node:
                await self._set_ceph_status(state="error", reason=str(exc), summary=f"node {self.node}: {exc}")
            return Result(requeue_after=SUPERVISE)
        try:
            started = await engine.ensure_running()
            if started:
                log.warning("restarted Ceph daemons", extra={"daemons": started})
        except CephError as exc:
            log.error("Ceph daemons do not start", extra={"error": str(exc)})
        try:
            await self._unfence(ceph, engine)
        except CephError as exc:
            log.error("the fence on this node cannot be lifted yet", extra={"error": str(exc)})
        try:
            await self._converge_mon(ceph, engine, sealed)
        except (CephError, errors.MinicloudError) as exc:
            log.error("this node's monitor does not follow the storage cluster record", extra={"error": str(exc)})
        self._leading = await self._leads(ceph.spec)
        if self._leading:
            try:
                await self._lead(ceph, engine)
            except CephError as exc:
                await self._set_ceph_status(
                    state="error",
                    reason=str(exc),
                    summary="the monitors do not answer: " + str(exc),
                    observed_at=ids.now(),
                )
        return Result(requeue_after=SUPERVISE)

    async def _converge_mon(self, ceph: Any, engine: Any, sealed: dict[str, str]) -> None:
        """This node runs a MON exactly when the record's ``mons`` names it (the services leader places them:
        :mod:`minicloud.storage.mons`): a new one joins the running MONs (:meth:`CephEngine.add_mon`, with a standby
        MGR), one no longer named leaves the monmap and stops (:meth:`CephEngine.remove_mon`). ``mon_host`` of every
        node's ``ceph.conf`` follows the record through the engine's settings (:meth:`_engine_for`)."""
        from agent.storage.ceph import CephKeys

        mons = ceph.spec.mons
        state = self._engine
        if self.node in mons and len(mons) == 1 and state is not None and not state.mon_placed and engine.has_mon():
            # The record moved the cluster's only MON (from 127.0.0.1, where a lone node enabled storage before the
            # cluster was formed, to this node's cluster address: minicloud.storage.mons): move it.
            if await engine.readdress_mon():
                log.warning("moved this node's monitor to its cluster address", extra={"mons": mons})
            state.mon_placed = await engine.mon_bound_address() == engine.settings.address
        # A MON taken out of the monmap never starts again ("must have been removed"): make it anew.
        gone = self.node in mons and engine.has_mon() and not engine.mon_running()
        if gone and self.node not in await engine.mon_names():
            log.warning("this node's monitor was taken out of the monitor map; making it again")
            await engine.remove_mon(self.node)
        if self.node in mons and not engine.has_mon():
            log.warning("this node becomes a Ceph monitor", extra={"mons": sorted(mons)})
            entities = {e: self.keystore.decrypt(token, e.encode()).decode() for e, token in sealed.items()}
            await engine.add_mon(CephKeys.from_entities(entities))
        elif mons and self.node not in mons and engine.has_mon():
            record = await self.store.get_by_name(CEPH.name, "", CEPH_NAME)  # afresh: never on a stale read
            mons = CEPH.load(record).spec.mons if record is not None else {}
            if mons and self.node not in mons:
                log.warning("this node stops being a Ceph monitor", extra={"mons": sorted(mons)})
                await engine.remove_mon(self.node)

    async def _bootstrap(self, ceph: Any, engine: Any) -> dict[str, str]:
        """Bootstrap (or, after a crash between bootstrap and recording, read back) the cluster's keys, create the
        client key, and record them all sealed. Returns the sealed keys the record holds afterwards."""
        from agent.storage.ceph import CephError, CephKeys

        if engine.mon_dir().exists():
            keys = {
                "mon.": _read_key(engine.mon_dir() / "keyring", "mon."),
                "client.admin": _read_key(engine.admin_keyring, "client.admin"),
                "client.bootstrap-osd": _read_key(engine.bootstrap_osd_keyring, "client.bootstrap-osd"),
            }
            if not all(keys.values()):
                raise CephError(
                    f"{engine.mon_dir()} exists but its keys are incomplete: a bootstrap failed half-way; remove "
                    f"{self.ceph_root} on node {self.node} and the cluster will bootstrap again"
                )
            ckeys = CephKeys.from_entities({k: v for k, v in keys.items() if v})
            await engine.install_keys(ckeys)
            await engine.ensure_running()
            log.warning("recovering the keys of a bootstrap that was not recorded")
        else:
            await self._set_ceph_status(
                state="bootstrapping", summary=f"creating the first monitor and manager on {self.node}"
            )
            ckeys = await engine.bootstrap()
        faults.point("storage.ceph.after_bootstrap")
        entities = dict(ckeys.entities())
        pools = tuple(ceph.spec.pools or [DEFAULT_CEPH_POOL])
        out = await engine.ceph("auth", "get-or-create-key", CLIENT, *self._client_caps(pools))
        entities[CLIENT] = out["key"] if isinstance(out, dict) else str(out).strip()
        self._caps_pools = pools
        sealed = {e: self.keystore.encrypt(k.encode(), e.encode()) for e, k in entities.items()}

        def mutate(record: Record) -> Record | None:
            current = CEPH.load(record)
            if current.spec.keys:
                return None  # recorded already (by an earlier attempt of ours)
            return CEPH.dump(current.replace(spec=msgspec.structs.replace(current.spec, keys=sealed)))

        written = await update_record(self.store, CEPH.name, ceph.id, mutate)
        if written is None:
            raise CephError("the storage cluster record was deleted during the bootstrap")
        return dict(CEPH.load(written).spec.keys)

    @staticmethod
    def _client_caps(pools: Iterable[str]) -> list[str]:
        osd = ", ".join(f"profile rbd pool={p}" for p in sorted(set(pools)))
        return ["mon", "profile rbd", "osd", osd, "mgr", "profile rbd"]

    async def _install(self, ceph: Any, engine: Any, sealed: dict[str, str]) -> None:
        """Install the record's keys on this node (once per set of keys) and publish the cephx secret."""
        from agent.storage.ceph import CephKeys

        assert self._engine is not None
        stamp = tuple(sorted(sealed.items()))
        if self._engine.installed == stamp and self._keys_ready:
            return
        entities = {e: self.keystore.decrypt(token, e.encode()).decode() for e, token in sealed.items()}
        await engine.install_keys(CephKeys.from_entities(entities))
        client = entities.get(CLIENT)
        if client is None:
            raise StorageError(f"the storage cluster record has no key for {CLIENT}")
        from agent.storage.ceph import keyring_text

        write_private(self._client_keyring(engine), keyring_text(CLIENT, client))
        self._engine.installed = stamp
        fsid = ceph.spec.fsid
        self.storage.set_ceph_secret(
            CephSecret(
                uuid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"minicloud:ceph:{fsid}:{CLIENT}")),
                usage=f"minicloud {CLIENT} {fsid}",
                key=base64.b64decode(client),
                user=CLIENT_USER,
            )
        )
        self._set_keys_ready(True)

    def _client_keyring(self, engine: Any) -> Path:
        return Path(engine.root) / f"{CLIENT}.keyring"

    def _set_keys_ready(self, ready: bool) -> None:
        if ready == self._keys_ready:
            return
        self._keys_ready = ready
        if not ready:
            self.storage.set_ceph_secret(None)
            for pool_id, (_, drv) in list(self._drivers.items()):
                if drv.name == "ceph":
                    self._drivers.pop(pool_id)
                    self.storage.withdraw(pool_id)
        self._enqueue(NODE_KEY)
        task = asyncio.get_running_loop().create_task(self._enqueue_all(), name="storage-engine-ready")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _enqueue_all(self) -> None:
        """The engine became (un)usable here: every pool and disk of this node may change."""
        with contextlib.suppress(Exception):
            for record in await list_all(self.store, POOL.name):
                self._enqueue(record.id)
            for record in await list_all(self.store, STORAGE_DISK.name, where={"node": self.node}):
                self._enqueue(record.id)

    async def _leads(self, spec: CephSpec) -> bool:
        """Whether this node writes the cluster's status: the bootstrap node, else the first MON node by name; a node
        that is offline is passed over."""
        for candidate in [spec.bootstrap_node, *sorted(spec.mons)]:
            if candidate == self.node:
                return True
            if not await self._node_lost(candidate):
                return False
        return False

    async def _lost_for(self, node: str) -> float | None:
        """How long ``node`` has been lost (seconds; infinite when removed, or offline since an unknown time), or
        None while it is not (see :meth:`_node_lost`)."""
        record = await self.store.get_by_name(NODE.name, "", node)  # one read (not _node_lost's and then ours)
        if record is None:
            return math.inf if await self.store.list(NODE.name, project="", limit=1) else None
        status = NODE.load(record).status
        if status.state != "offline":
            return None
        last = status.last_contact
        if not last:
            return math.inf
        try:
            since = _dt.datetime.fromisoformat(last.replace("Z", "+00:00"))
        except ValueError:
            return math.inf
        return max(0.0, (_dt.datetime.now(_dt.UTC) - since).total_seconds())

    async def _node_lost(self, node: str) -> bool:
        """Whether the cluster says ``node`` is lost: its ``node`` record is offline, or the cluster has node records
        and none for it (removed)."""
        record = await self.store.get_by_name(NODE.name, "", node)
        if record is None:
            return bool(await self.store.list(NODE.name, project="", limit=1))
        return NODE.load(record).status.state == "offline"

    async def _lead(self, ceph: Any, engine: Any) -> None:
        spec: CephSpec = ceph.spec
        pools = tuple(spec.pools or [DEFAULT_CEPH_POOL])
        if self._pools_ensured != (id(engine), pools):  # once per set of pools: each costs `ceph` commands
            for pool in pools:
                await engine.ensure_pool(pool)
            self._pools_ensured = (id(engine), pools)
        if self._caps_pools != pools:
            await engine.ceph("auth", "caps", CLIENT, *self._client_caps(pools))
            self._caps_pools = pools
        st = await engine.status()
        await self._remove_stray_mons(st, engine)
        osds = [_osd_info(o) for o in getattr(st, "osds", [])]
        # Replicas follow the hosts holding data: OSDs that are in (a node down for less than the down-out interval
        # keeps its share; once its OSDs are marked out, the copies are made on the others).
        hosts = {o.node for o in osds if o.in_cluster}
        replicas = min(3, max(1, len(hosts)))
        if replicas != self._replicas:
            await engine.set_replicas(replicas)
            self._replicas = replicas
            st = await engine.status()  # the pools' new size, and their PGs peering again: not the status before
        ready = bool(getattr(st, "ready", False)) and any(o.up for o in osds)
        current = ceph.status
        if ready:
            state = "ready"
        elif current.state == "bootstrapping" or not current.state:
            state = "bootstrapping"
        else:
            state = "error"
        summary = str(getattr(st, "summary", ""))
        lost = await self._lost_words(st, spec)
        if lost:
            summary = f"{lost[0].upper()}{lost[1:]}; {summary}" if summary else f"{lost[0].upper()}{lost[1:]}."
        if not hosts and not summary:
            summary = "no OSD is up yet: add a disk with `minicloud storage disk add`"
        fields: dict[str, Any] = {
            "state": state,
            "health": str(getattr(st, "health", "")),
            "summary": summary,
            "capacity_bytes": int(getattr(st, "capacity_bytes", 0) or 0),
            "used_bytes": int(getattr(st, "used_bytes", 0) or 0),
            "available_bytes": int(getattr(st, "available_bytes", 0) or 0),
            "pgs": dict(getattr(st, "pgs", {}) or {}),
            "osds": osds,
            "reason": "" if ready else summary,
        }
        stale = time.monotonic() - self._status_written > STATUS_REFRESH
        same = all(getattr(current, k) == v for k, v in fields.items()) and spec.replicas == replicas
        if same and not stale:
            return
        await self._set_ceph_status(spec={"replicas": replicas}, observed_at=ids.now(), **fields)
        self._status_written = time.monotonic()

    async def _remove_stray_mons(self, st: Any, engine: Any) -> None:
        """Take out of the monmap the MONs the record no longer names whose node cannot do it itself: out of quorum,
        and lost (offline, or removed from the cluster). A MON that runs takes itself out (:meth:`_converge_mon`); the
        record is read afresh, so a MON that joined since this pass read it is never taken for a stray."""
        record = await self.store.get_by_name(CEPH.name, "", CEPH_NAME)
        mons = CEPH.load(record).spec.mons if record is not None else {}
        if not mons:
            return
        for m in getattr(st, "mons", []):
            if m.name in mons or m.in_quorum or not await self._node_lost(m.name):
                continue
            log.warning("removing the monitor of a lost node the storage cluster record no longer names",
                        extra={"mon": m.name})  # fmt: skip
            await engine.remove_mon(m.name)

    async def _lost_words(self, st: Any, spec: CephSpec) -> str:
        """What the lost nodes among the MON and OSD nodes mean, in plain words ("" when none is lost)."""
        from agent.storage.ceph_status import CephStatus as EngineStatus
        from agent.storage.ceph_status import lost_nodes_words

        if not isinstance(st, EngineStatus):
            return ""
        nodes = {m.name for m in st.mons} | {o.node for o in st.osds if o.node}
        lost = {n for n in nodes if await self._node_lost(n)}
        interval = int(getattr(self._engine.engine.settings, "down_out_interval", 60)) if self._engine else 60
        return lost_nodes_words(st, lost, interval) if lost else ""

    async def _set_ceph_status(self, *, spec: dict[str, Any] | None = None, **fields: Any) -> None:
        record = await self.store.get_by_name(CEPH.name, "", CEPH_NAME)
        if record is not None:
            await self._set_status(CEPH, record.id, spec=spec, **fields)

    # -- disks -------------------------------------------------------------------------------------------------------
    def _intent(self, disk_id: str) -> Path:
        return self.intents_dir / f"{disk_id}.json"

    def _read_intent(self, disk_id: str) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self._intent(disk_id).read_text()))
        except (OSError, ValueError):
            return None

    def _local_osds(self, engine: Any) -> set[int]:
        return {int(d.id) for d in engine.daemons() if d.type == "osd"}

    async def _recorded_osds(self, disk_id: str) -> set[int]:
        """OSD ids this node's other disks claim (records and intent files)."""
        claimed: set[int] = set()
        for record in await list_all(self.store, STORAGE_DISK.name, where={"node": self.node}):
            if record.id == disk_id:
                continue
            osd = STORAGE_DISK.load(record).status.osd_id
            if osd is not None:
                claimed.add(osd)
            intent = self._read_intent(record.id) or {}
            if isinstance(intent.get("osd_id"), int):
                claimed.add(intent["osd_id"])
        return claimed

    async def _find_osd(self, engine: Any, disk_id: str, recorded: int | None) -> int | None:
        """The OSD of ``disk_id``: recorded, in its intent file, or (made but not recorded before a crash) the one
        new OSD of this node that no other disk claims."""
        if recorded is not None:
            return recorded
        intent = self._read_intent(disk_id)
        if intent is None:
            return None
        if isinstance(intent.get("osd_id"), int):
            return int(intent["osd_id"])
        before = set(intent.get("before", []))
        new = self._local_osds(engine) - before - await self._recorded_osds(disk_id)
        if len(new) > 1:
            raise _Refused(
                f"cannot tell which of osd.{', osd.'.join(map(str, sorted(new)))} belongs to this disk after a crash"
            )
        return new.pop() if new else None

    async def _reconcile_disk(self, disk_id: str) -> Result:
        record = await self.store.get(STORAGE_DISK.name, disk_id)
        if record is None:
            self._intent(disk_id).unlink(missing_ok=True)
            return Result()
        disk = STORAGE_DISK.load(record)
        if disk.spec.node != self.node:
            return Result()
        if not self._keys_ready or self._engine is None:
            return Result()  # queued again when the engine is usable here
        engine = self._engine.engine
        from agent.storage.ceph import CephError

        try:
            async with self._osd_lock:
                osd = await self._find_osd(engine, disk_id, disk.status.osd_id)
                if disk.spec.remove:
                    return await self._remove_disk(disk, record, engine, osd)
                if osd is None:
                    await self._set_status(STORAGE_DISK, disk_id, state="creating", reason="")
                    osd = await self._add_osd(engine, disk)
                    faults.point("storage.disk.after_add")
                write_private(self._intent(disk_id), json.dumps({"osd_id": osd}))
            st = await engine.status()
            up = any(getattr(o, "id", None) == osd and getattr(o, "up", False) for o in getattr(st, "osds", []))
            await self._set_status(
                STORAGE_DISK, disk_id, osd_id=osd, state="up" if up else "down", reason="" if up else "the OSD is down"
            )
        except (CephError, StorageError, _Refused) as exc:
            log.warning("storage disk step failed", extra={"disk": disk_id, "error": str(exc)})
            await self._set_status(STORAGE_DISK, disk_id, state="error", reason=str(exc))
            return Result(requeue_after=ERROR_RETRY)
        return Result(requeue_after=DISK_REFRESH)

    async def _add_osd(self, engine: Any, disk: Any) -> int:
        write_private(self._intent(disk.id), json.dumps({"before": sorted(self._local_osds(engine))}))
        if disk.spec.source == "device":
            return int(await engine.add_osd_device(disk.spec.path))
        return int(await engine.add_osd_file(disk.spec.size_bytes))

    async def _remove_disk(self, disk: Any, record: Record, engine: Any, osd: int | None) -> Result:
        if osd is not None:
            await self._set_status(STORAGE_DISK, disk.id, state="draining", reason="", osd_id=osd)
            await engine.remove_osd(osd)
            faults.point("storage.disk.after_remove")
        self._intent(disk.id).unlink(missing_ok=True)
        await self._delete_record(STORAGE_DISK, disk.id)
        return Result()

    # -- pools -------------------------------------------------------------------------------------------------------
    async def _reconcile_pool(self, pool_id: str) -> Result:
        record = await self.store.get(POOL.name, pool_id)
        if record is None:
            self._drivers.pop(pool_id, None)
            self.storage.withdraw(pool_id)
            return Result()
        spec = POOL.load(record).spec
        settings: dict[str, Any]
        if spec.driver == "local":
            settings = {"root": self.storage_dir / pool_id}
        elif spec.driver == "ceph" and spec.ceph_pool and self._keys_ready and self._engine is not None:
            engine = self._engine.engine
            secret = self.storage.ceph_secret()
            port = getattr(engine.settings, "mon_port", 3300)
            settings = {
                "pool": spec.ceph_pool,
                "conf": Path(engine.conf_path),
                "keyring": self._client_keyring(engine),
                "user": CLIENT_USER,
                "hosts": tuple((a, port) for _, a in sorted(engine.settings.mon_hosts.items())),
                "secret_uuid": secret.uuid if secret is not None else "",
            }
        else:
            self._drivers.pop(pool_id, None)
            self.storage.withdraw(pool_id)
            return Result()  # queued again once this node has the cluster's keys
        signature = (spec.driver, tuple(sorted((k, str(v)) for k, v in settings.items())))
        made = self._drivers.get(pool_id)
        if made is None or made[0] != signature:
            try:
                driver = self.driver_factory(spec.driver, **settings)
            except StorageError as exc:
                log.error("a pool's driver cannot be made", extra={"pool": pool_id, "error": str(exc)})
                return Result(requeue_after=ERROR_RETRY)
            made = self._drivers[pool_id] = (signature, driver)
        self.storage.publish(pool_id, made[1])
        return Result()

    def _driver(self, pool_id: str) -> VolumeDriver | None:
        return self.storage.driver(pool_id)

    # -- volumes -----------------------------------------------------------------------------------------------------
    async def _reconcile_volume(self, vol: Any) -> Result:
        spec, status = vol.spec, vol.status
        driver = self._driver(spec.pool)
        if driver is None:
            if spec.deleted and await self.store.get(POOL.name, spec.pool) is None:
                await self._delete_record(VOLUME, vol.id)  # its pool is gone, and the data with it
                return Result()
            return self._wait_for_pool(spec.pool, vol.id)
        if spec.previous_node and spec.previous_node != self.node:
            await self._fence(vol, driver)
            faults.point("storage.volume.after_fence")
        if spec.deleted:
            return await self._delete_volume(vol, driver)
        size = await driver.size(vol.id)
        if size is None:
            await self._create_volume(vol, driver)
            faults.point("storage.volume.after_create")
            size = await driver.size(vol.id)
        want = spec.size_gib * GIB
        if size is not None and size < want:
            await driver.resize(vol.id, want)
            faults.point("storage.volume.after_resize")
            size = want
        changes: dict[str, Any] = {"size_gib": _gib(size)}
        result = Result()
        if spec.revert.seq > status.revert_seq and spec.revert.snapshot:
            if spec.attachment is not None:
                # the service refuses a revert of an attached volume; one attached since waits for its detach
                result = Result(requeue_after=RETRY)
            else:
                await self._set_status(VOLUME, vol.id, state="reverting", reason="")
                await driver.rollback(vol.id, spec.revert.snapshot)
                faults.point("storage.volume.after_revert")
                changes["revert_seq"] = spec.revert.seq
        if spec.flatten and not status.flattened:
            # the driver's flatten is done if the volume has no parent: after a crash here it is simply recorded
            await driver.flatten(vol.id)
            faults.point("storage.volume.after_flatten")
            await flattened(Context.system(f"storage@{self.node}", action="storage:volumes"), self.store, vol.id)
        fresh = await self.store.get(VOLUME.name, vol.id)
        current = VOLUME.load(fresh).status.state if fresh is not None else status.state
        if current in _MINE or not current:
            changes["state"] = self._resting_state(vol)
            changes["reason"] = ""
        await self._set_status(VOLUME, vol.id, **changes)
        return result

    @staticmethod
    def _resting_state(vol: Any) -> str:
        """Where a volume is once this reconciler's step is done: ``available`` when detached, else the attachment
        state the compute reconciler had (``attaching`` until it has plugged the disk)."""
        att = vol.spec.attachment
        if att is None:
            return "available"
        return "in-use" if vol.status.device and vol.status.device == att.device else "attaching"

    async def _create_volume(self, vol: Any, driver: VolumeDriver) -> None:
        spec = vol.spec
        size = spec.size_gib * GIB
        source = spec.source
        if source.type == "image":
            record = await self.store.get(IMAGE.name, source.id)
            if record is None:
                raise _Refused(f"image {source.name or source.id} no longer exists")
            image = IMAGE.load(record)
            if image.spec.pool != spec.pool:
                raise _Refused(f"image {image.name} is not in pool {spec.pool_name or spec.pool}")
            if image.status.pool_state != "ready":
                if image.status.pool_state == "error":
                    raise _Refused(f"image {image.name} could not be copied into the pool: {image.status.reason}")
                raise _Waiting()
            await driver.clone(image.id, "base", vol.id, size)
        elif source.type == "backup":
            raise _Waiting()  # the backups reconciler restores the chain and puts the image in place
        elif source.type == "snapshot":
            record = await self.store.get(SNAPSHOT.name, source.id)
            if record is None:
                raise _Refused(f"snapshot {source.name or source.id} no longer exists")
            snap = SNAPSHOT.load(record)
            if snap.status.state != "available":
                if snap.spec.deleted or snap.status.state == "error":
                    raise _Refused(f"snapshot {snap.name} is not available ({snap.status.state})")
                raise _Waiting()
            await driver.clone(rbd_image(snap.spec), snap.id, vol.id, size)
            if snap.spec.instance:
                # a volume from a root-disk snapshot must outlive the instance, whose root disk (and its
                # snapshots) goes with it: it takes its own copy of the data
                await driver.flatten(vol.id)
        else:
            await driver.create(vol.id, size)

    async def _delete_volume(self, vol: Any, driver: VolumeDriver) -> Result:
        if vol.spec.attachment is not None:
            return Result(requeue_after=RETRY)  # the compute reconciler unplugs it first
        try:
            await driver.delete(vol.id)
        except InUse as exc:
            await self._set_status(VOLUME, vol.id, state="error", reason=str(exc))
            return Result(requeue_after=ERROR_RETRY)
        faults.point("storage.volume.after_delete")
        await self._delete_record(VOLUME, vol.id)
        return Result()

    async def _fence(self, vol: Any, driver: VolumeDriver) -> None:
        """The volume moved here from ``previous_node``: if that node is lost, blocklist its Ceph clients before
        anything here writes the volume (a half-dead node must never write it again); then forget the field."""
        previous = vol.spec.previous_node
        lost_for = await self._lost_for(previous) if driver.name == "ceph" else None
        if lost_for is not None and lost_for < FENCE_GRACE:
            # Offline for a moment only (a heartbeat missed under load, a short partition): fencing it now would
            # cut every Ceph client of a node that may be fine; look again until it is back or surely lost.
            raise _Waiting()
        if lost_for is not None:
            record = await self.store.get_by_name(NODE.name, "", previous)
            address = _ip(NODE.load(record).spec.address) if record is not None else ""
            if not address:
                raise _Refused(f"node {previous} is lost and its address is unknown: it cannot be fenced")
            if self._engine is None or address in (self._my_address, self._engine.signature[2]):
                raise _Refused(f"node {previous} shares this node's address {address}: it cannot be fenced")
            await self._engine.engine.blocklist_add(address, expire_seconds=FENCE_SECONDS)
            await self._record_fence(previous, address)
            log.warning("fenced a lost node's Ceph clients", extra={"node": previous, "address": address})

        def clear(record: Record) -> Record | None:
            current = VOLUME.load(record)
            if current.spec.previous_node != previous:
                return None
            return VOLUME.dump(current.replace(spec=msgspec.structs.replace(current.spec, previous_node="")))

        await update_record(self.store, VOLUME.name, vol.id, clear)

    async def _record_fence(self, node: str, address: str) -> None:
        """Write the fence into the ``cephcluster`` record (``fenced``), so the node lifts it when it is back."""
        fence = Fence(address=address, since=ids.now(), by=self.node)

        def add(record: Record) -> Record | None:
            current = CEPH.load(record)
            if (old := current.spec.fenced.get(node)) is not None and old.address == address:
                return None
            fenced = {**current.spec.fenced, node: fence}
            return CEPH.dump(current.replace(spec=msgspec.structs.replace(current.spec, fenced=fenced)))

        record = await self.store.get_by_name(CEPH.name, "", CEPH_NAME)
        if record is None:
            raise _Refused("the storage cluster record is gone: the fence cannot be recorded")
        await update_record(self.store, CEPH.name, record.id, add)

    async def _unfence(self, ceph: Any, engine: Any) -> None:
        """This node is back: lift the fences on it (its own name; or its address, fenced under the name of a node
        the cluster no longer has) — only once no stale guest is left here (the compute reconciler has swept the
        node's domains since this agent started; none can exist where compute is off). ``blocklist rm`` first, then
        the entry goes (only the entry read: a fence written meanwhile stays and is lifted on the next pass)."""
        fenced: dict[str, Fence] = ceph.spec.fenced
        if not fenced:
            return
        mine = {self._my_address, _ip(ceph.spec.mons.get(self.node, ""))} - {""}
        lifts = {}
        for node, fence in fenced.items():
            gone = fence.address in mine and await self.store.get_by_name(NODE.name, "", node) is None
            if node == self.node or gone:
                lifts[node] = fence
        if not lifts:
            return
        if self.config.compute.driver != "none" and not self.storage.guests_checked:
            log.info("this node is fenced; lifting it once its stale guests are gone", extra={"fences": sorted(lifts)})
            return
        for node, fence in sorted(lifts.items()):
            await engine.blocklist_rm(fence.address)

            def drop(record: Record, node: str = node, fence: Fence = fence) -> Record | None:
                current = CEPH.load(record)
                if current.spec.fenced.get(node) != fence:
                    return None
                fenced = {n: f for n, f in current.spec.fenced.items() if n != node}
                return CEPH.dump(current.replace(spec=msgspec.structs.replace(current.spec, fenced=fenced)))

            await update_record(self.store, CEPH.name, ceph.id, drop)
            log.warning("lifted the fence on this node's Ceph clients", extra={"node": node, "address": fence.address})

    # -- snapshots ---------------------------------------------------------------------------------------------------
    async def _reconcile_snapshot(self, snap: Any) -> Result:
        spec = snap.spec
        image = rbd_image(spec)
        if spec.instance and await self.store.get(INSTANCE.name, spec.instance) is None:
            # a root-disk snapshot whose instance was deleted: its data went with the root disk
            await forget_root_snapshot(Context.system(f"storage@{self.node}", action="storage:snapshots"), self.store,
                                       snap.id)  # fmt: skip
            return Result()
        pool = spec.pool
        if not pool:
            parent = await self.store.get(VOLUME.name, spec.volume)
            pool = VOLUME.load(parent).spec.pool if parent is not None else ""
        driver = self._driver(pool) if pool else None
        if driver is None:
            if spec.deleted and (not pool or await self.store.get(POOL.name, pool) is None):
                await self._delete_record(SNAPSHOT, snap.id)
                return Result()
            return self._wait_for_pool(pool, snap.id)
        if spec.deleted:
            try:
                await driver.delete_snapshot(image, snap.id)
            except InUse:
                kids = await driver.children(image, snap.id)
                reason = f"volumes cloned from it depend on it: {', '.join(kids)}" if kids else "it is in use"
                await self._set_status(SNAPSHOT, snap.id, state="error", reason=reason)
                return Result(requeue_after=ERROR_RETRY)
            faults.point("storage.snapshot.after_delete")
            await self._delete_record(SNAPSHOT, snap.id)
            return Result()
        if snap.status.state != "available":
            await driver.snapshot(image, snap.id)
            faults.point("storage.snapshot.after_create")
            await self._set_status(SNAPSHOT, snap.id, state="available", reason="")
        if spec.instance and spec.revert_seq > snap.status.revert_seq:
            await self._revert_root(snap, driver, image)
        # a root-disk snapshot is looked at again now and then: its instance's delete is no change of ours
        return Result(requeue_after=ROOT_SNAPSHOT_CHECK) if spec.instance else Result()

    async def _revert_root(self, snap: Any, driver: VolumeDriver, image: str) -> None:
        """Roll the instance's root disk back to the snapshot, only while the instance is stopped (the service
        checked; a start since makes this wait): the driver also refuses an image a client has open."""
        record = await self.store.get(INSTANCE.name, snap.spec.instance)
        inst = INSTANCE.load(record) if record is not None else None
        reason = ""
        if inst is None or inst.spec.power != "stopped" or inst.status.state != "stopped":
            reason = "not reverted: the instance was started first; stop it and revert again"
        else:
            try:
                await driver.rollback(image, snap.id)
            except InUse as exc:
                reason = f"not reverted: {exc}; stop the instance and revert again"
            faults.point("storage.snapshot.after_root_revert")
        # done, or given up with the reason (the snapshot stays available: a revert can be asked again)
        await self._set_status(SNAPSHOT, snap.id, state="available", reason=reason, revert_seq=snap.spec.revert_seq)

    # -- images ------------------------------------------------------------------------------------------------------
    async def _reconcile_image(self, image_id: str) -> Result:
        record = await self.store.get(IMAGE.name, image_id)
        if record is None:
            self._image_tried.pop(image_id, None)
            self._enqueue(NODE_KEY)
            return Result()
        image = IMAGE.load(record)
        if not image.spec.pool or image.spec.node != self.node or image.status.pool_state == "ready":
            return Result()
        if image.status.pool_state == "error":
            tried = self._image_tried.get(image_id)
            if tried is not None and time.monotonic() - tried < 10 * ERROR_RETRY:
                return Result()  # a bad file stays bad: not every resync
        driver = self._driver(image.spec.pool)
        if driver is None:
            return self._wait_for_pool(image.spec.pool, image_id)
        self._image_tried[image_id] = time.monotonic()
        try:
            if image.status.pool_state != "importing":
                await self._set_status(IMAGE, image_id, pool_state="importing", reason="")
            disk = self.images_dir / image_id / "disk"
            if not await driver.exists(image_id) and not disk.exists():
                raise _Refused(f"the image's disk file is missing on node {self.node}")
            await driver.import_file(disk, image_id)
            faults.point("storage.image.after_import")
            await driver.snapshot(image_id, "base", protect=True)
        except (StorageError, _Refused) as exc:
            log.warning("copying an image into its pool failed", extra={"image": image_id, "error": str(exc)})
            await self._set_status(IMAGE, image_id, pool_state="error", reason=str(exc))
            return Result()
        await self._set_status(IMAGE, image_id, pool_state="ready", reason="")
        self._image_tried.pop(image_id, None)
        return Result()

    # -- the sweep ---------------------------------------------------------------------------------------------------
    async def _sweep(self) -> Result:
        """Remove pool copies of images and volumes no record names (this node's local pools; the ceph pools when
        this node leads). The pool is listed *before* the records: a record is always created before its data, so
        whatever the listing shows without a record has lost its record."""
        for pool_id, driver in self.storage.pools().items():
            if driver.name == "ceph" and not self._leading:
                continue
            if driver.name not in ("ceph", "local"):
                continue
            try:
                names = [n for n in await driver.list() if n.startswith((f"{IMAGE.prefix}-", f"{VOLUME.prefix}-"))]
            except StorageError as exc:
                log.warning("cannot list a pool to sweep it", extra={"pool": pool_id, "error": str(exc)})
                continue
            for name in names:
                kind = IMAGE if name.startswith(f"{IMAGE.prefix}-") else VOLUME
                if await self.store.get(kind.name, name) is not None:
                    continue
                try:
                    await driver.delete(name)
                    log.warning("removed pool data no record names", extra={"pool": pool_id, "volume": name})
                except StorageError as exc:
                    log.warning(
                        "cannot remove pool data no record names",
                        extra={"pool": pool_id, "volume": name, "error": str(exc)},
                    )
            await self._sweep_partials(pool_id, driver)
        return Result()

    async def _sweep_partials(self, pool_id: str, driver: VolumeDriver) -> None:
        """Temporary leftovers of creates and imports a crash interrupted (``img-….part``: :meth:`VolumeDriver.list`
        hides them): removed when no record names them, or once nothing has written them for
        :data:`PART_IDLE` seconds (an import in progress writes, and the RBD driver refuses to remove one still open;
        an image whose copy is retried starts a fresh one)."""
        try:
            parts = await driver.partials()
        except StorageError as exc:
            log.warning("cannot list a pool's leftovers", extra={"pool": pool_id, "error": str(exc)})
            return
        for name, idle in parts.items():
            if not name.startswith((f"{IMAGE.prefix}-", f"{VOLUME.prefix}-")):
                continue
            kind = IMAGE if name.startswith(f"{IMAGE.prefix}-") else VOLUME
            if idle < PART_IDLE and await self.store.get(kind.name, name) is not None:
                continue
            try:
                await driver.delete_partial(name)
                log.warning("removed an interrupted import's leftover", extra={"pool": pool_id, "volume": name})
            except StorageError as exc:
                log.info("a leftover stays for now", extra={"pool": pool_id, "volume": name, "error": str(exc)})

    # -- store writes ------------------------------------------------------------------------------------------------
    async def _set_status(
        self, kind: Kind[Any, Any], id_: str, *, spec: dict[str, Any] | None = None, **fields: Any
    ) -> Record | None:
        """Set typed status fields (and the few spec fields a node owns) with compare-and-swap; stored fields this
        version does not know are kept. A volume or snapshot being deleted keeps showing ``deleting`` (its view
        says so) unless the step failed."""

        def merge(record: Record) -> Record | None:
            current = kind.load(record)
            new_status = msgspec.structs.replace(current.status, **fields)
            new_spec = msgspec.structs.replace(current.spec, **spec) if spec else current.spec
            if new_status == current.status and new_spec == current.spec:
                return None
            return msgspec.structs.replace(
                record,
                spec={**record.spec, **msgspec.to_builtins(new_spec)} if new_spec != current.spec else record.spec,
                status={**record.status, **msgspec.to_builtins(new_status)},
            )

        return await update_record(self.store, kind.name, id_, merge)

    async def _delete_record(self, kind: Kind[Any, Any], id_: str) -> None:
        """Delete the record (compare-and-swap on the revision read; a concurrent write makes the reconcile retry)."""
        record = await self.store.get(kind.name, id_)
        if record is None:
            return
        try:
            await self.store.commit(Txn([Delete(kind=kind.name, id=id_, expect_revision=record.revision)]))
        except TxnFailed as exc:
            if exc.reason != "not-found":
                raise


class _Waiting(_Refused):
    """The step waits for another record's node (an image being imported, a snapshot being taken)."""


__all__ = ["ENGINE_KEY", "NODE_KEY", "StorageReconciler", "real_engine_factory"]
