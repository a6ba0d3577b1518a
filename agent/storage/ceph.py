"""The Ceph cluster minicloud owns: bootstrap, supervision of this node's daemons, OSDs, pools, status, fencing.

No systemd and no cephadm: the agent writes ``ceph.conf`` and the keyrings under ``CephSettings.root``, creates the
MON/MGR/OSD data directories with Ceph's own tools (``ceph-authtool``, ``monmaptool``, ``ceph-mon --mkfs``,
``ceph osd new`` + ``ceph-osd --mkfs``) and starts the daemons as root. Each daemon daemonizes itself (Ceph's
pre-forker: the command we run returns once the daemon has initialised, with its exit status) and writes its pid file
under ``root/run/``. The daemons outlive the agent; a restarted agent *adopts* them: a daemon counts as running when
a process whose command line names this cluster's ``ceph.conf`` and the daemon's id exists (the pid file is only the
fast path — the MGR re-executes and re-daemonizes itself when its module set changes, so its pid changes).

What this node runs is read from disk, never remembered: ``mon/ceph-<node>/`` means a MON, ``mgr/ceph-<node>/keyring``
an MGR, each ``osd/<id>/ready`` an OSD. Every call is idempotent unless its docstring says otherwise; every failure
raises :class:`CephError` whose message carries the failing command's stderr (never a key).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import stat
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from agent.process import arg, wait_gone
from agent.storage.ceph_status import CephStatus, status_from_json

__all__ = [
    "CephEngine",
    "CephError",
    "CephKeys",
    "CephSettings",
    "CephStatus",
    "check_block_device",
    "render_conf",
]

#: The longest path a Unix socket can have (``sun_path`` is 108 bytes with its NUL).
UNIX_PATH_MAX = 107
#: Daemon kinds, in the order they are started.
DAEMON_TYPES = ("mon", "mgr", "osd")


class CephError(Exception):
    """A Ceph command failed, or the cluster is not in the state asked for. ``str()`` is for humans."""


class CephKeys(msgspec.Struct, frozen=True, kw_only=True):
    """The cluster's shared cephx secrets; the caller seals them into the ``cephcluster`` record."""

    mon: str  # "mon.": the MONs' shared key
    admin: str  # "client.admin"
    bootstrap_osd: str  # "client.bootstrap-osd": may create OSDs and nothing else

    def entities(self) -> dict[str, str]:
        """Entity name → secret (the record's ``keys`` map)."""
        return {"mon.": self.mon, "client.admin": self.admin, "client.bootstrap-osd": self.bootstrap_osd}

    @classmethod
    def from_entities(cls, keys: dict[str, str]) -> CephKeys:
        try:
            return cls(mon=keys["mon."], admin=keys["client.admin"], bootstrap_osd=keys["client.bootstrap-osd"])
        except KeyError as exc:
            raise CephError(f"the cluster record has no key for {exc.args[0]}") from None


@dataclass
class CephSettings:
    root: Path  # <data_dir>/ceph: ceph.conf, keyrings (0600), mon/, mgr/, osd/<id>/, log/, run/
    fsid: str
    node: str  # this node's name: the MON/MGR id and the CRUSH host
    address: str  # the IP every daemon binds (the cluster address; 127.0.0.1 on a single node)
    mon_hosts: dict[str, str] = field(default_factory=dict)  # node -> address of every MON (this one included)
    zone: str = ""  # the node's zone ("" none): its CRUSH host goes under a CRUSH zone of that name
    mon_port: int = 3300  # msgr2
    mon_port_v1: int = 6789  # msgr1 (older clients; QEMU's librbd speaks v2 too)
    osd_memory_target: int = 1 << 30
    #: Seconds an OSD may be down before the MONs mark it out and its data is copied elsewhere (Ceph's default is
    #: 600; a rack's nodes are few, so a lost one is re-replicated sooner). A node back within it just catches up.
    down_out_interval: int = 60
    prometheus_port: int = 9283  # the MGR's metrics exporter, bound to ``address`` only
    cli_timeout: float = 30.0  # seconds a ``ceph`` command may take
    start_timeout: float = 120.0  # seconds a daemon may take to initialise

    @property
    def socket_dir(self) -> Path:
        """Where the daemons' admin sockets go: ``root/run`` unless that would pass the Unix socket path limit (107
        bytes; pytest's temporary directories do), then a short per-cluster directory in ``/run``."""
        run = self.root / "run"
        if len(str(run)) + len("/client.bootstrap-osd.asok") <= UNIX_PATH_MAX:
            return run
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:8]
        return Path(f"/run/mcceph-{digest}")

    def mon_addrs(self, address: str) -> str:
        return f"[v2:{address}:{self.mon_port},v1:{address}:{self.mon_port_v1}]"


def render_conf(s: CephSettings) -> str:
    """The ``ceph.conf`` every daemon and client of this node reads (pure; golden-tested)."""
    root = s.root
    mons = s.mon_hosts or {s.node: s.address}
    lines = [
        "# Written by the minicloud agent; changes are overwritten.",
        "[global]",
        f"fsid = {s.fsid}",
        "mon_host = " + ",".join(s.mon_addrs(a) for _, a in sorted(mons.items())),
        # Bind this address only, for every daemon (MON from the monmap, MGR/OSD from these).
        f"public_addr = {s.address}",
        f"cluster_addr = {s.address}",
        "ms_bind_ipv4 = true",
        "ms_bind_ipv6 = false",
        "auth_cluster_required = cephx",
        "auth_service_required = cephx",
        "auth_client_required = cephx",
        "auth_allow_insecure_global_id_reclaim = false",
        # Each MON proposal waits this long (default 1 s: every pool create cost ~1 s).
        "paxos_propose_interval = 0.05",
        "osd_pool_default_pg_autoscale_mode = off",
        # The default warns at 30 % free space of the MON's disk; the MON still stops below 5 %.
        "mon_data_avail_warn = 10",
        "mon_allow_pool_delete = true",
        "mon_allow_pool_size_one = true",
        # A lost node's OSDs are marked out after this many seconds and their data re-replicates on the others.
        f"mon_osd_down_out_interval = {s.down_out_interval}",
        # minicloud picks the replica count from the number of hosts on purpose; `status()` says when it is 1.
        "mon_warn_on_pool_no_redundancy = false",
        # The default CRUSH rule (made at MON mkfs) places replicas on OSDs, so one host can keep several copies;
        # pools use minicloud's own rules (mc-osd / mc-host), chosen by how many hosts have OSDs.
        "osd_crush_chooseleaf_type = 0",
        # The only MGR module turned on at creation (restful and the dashboard are never turned on).
        "mgr_initial_modules = prometheus",
        f"run_dir = {root / 'run'}",
        f"crash_dir = {root / 'crash'}",
        f"log_file = {root / 'log'}/$name.log",
        f"mon_cluster_log_file = {root / 'log'}/$cluster.$channel.log",
        f"keyring = {root}/$name.keyring",
        "",
        "[mon]",
        f"mon_data = {root / 'mon'}/$cluster-$id",
        f"keyring = {root / 'mon'}/$cluster-$id/keyring",
        f"pid_file = {root / 'run'}/$name.pid",
        # Unix socket paths are limited to 107 bytes: a long root moves them to /run/mcceph-<hash>/.
        f"admin_socket = {s.socket_dir}/$name.asok",
        "",
        "[mgr]",
        f"mgr_data = {root / 'mgr'}/$cluster-$id",
        f"keyring = {root / 'mgr'}/$cluster-$id/keyring",
        f"pid_file = {root / 'run'}/$name.pid",
        f"admin_socket = {s.socket_dir}/$name.asok",
        "",
        "[osd]",
        f"osd_data = {root / 'osd'}/$id",
        f"keyring = {root / 'osd'}/$id/keyring",
        f"pid_file = {root / 'run'}/$name.pid",
        f"admin_socket = {s.socket_dir}/$name.asok",
        "osd_objectstore = bluestore",
        "bluestore_block_create = true",
        f"osd_memory_target = {s.osd_memory_target}",
        # An OSD moves itself there when it starts (osd_crush_update_on_start); the zone bucket is made if needed.
        f"crush_location = root=default{f' zone={s.zone}' if s.zone else ''} host={s.node}",
        "",
    ]
    return "\n".join(lines)


def crush_counts(tree: dict[str, Any] | None) -> tuple[int, int, int]:
    """From ``ceph osd tree``: the hosts with OSDs, the zones with such hosts, and those hosts in no zone. Pure."""
    nodes = {n.get("id"): n for n in (tree or {}).get("nodes", [])}
    hosts = {i for i, n in nodes.items() if n.get("type") == "host" and n.get("children")}
    zoned: set[Any] = set()
    zones = 0
    for n in nodes.values():
        if n.get("type") == "zone":
            inside = hosts & set(n.get("children", []))
            zoned |= inside
            zones += bool(inside)
    return len(hosts), zones, len(hosts - zoned)


def crush_rule(hosts: int, zones: int, unzoned: int, size: int) -> tuple[str, str]:
    """The CRUSH rule (name, failure domain) for pools of ``size`` copies. Pure.

    - ``mc-zone`` (each copy in another zone) when every host with OSDs is in a zone and there are at least two
      zones and as many as copies (nodes' zones: ``minicloud cluster join --zone``);
    - else ``mc-host`` (each copy on another host) from two hosts on;
    - else ``mc-osd`` (one host: copies on distinct OSDs)."""
    if zones >= max(2, size) and unzoned == 0:
        return "mc-zone", "zone"
    if hosts >= 2:
        return "mc-host", "host"
    return "mc-osd", "osd"


def keyring_text(entity: str, key: str, caps: dict[str, str] | None = None) -> str:
    out = [f"[{entity}]", f"\tkey = {key}"]
    out += [f'\tcaps {svc} = "{cap}"' for svc, cap in (caps or {}).items()]
    return "\n".join(out) + "\n"


ADMIN_CAPS = {"mon": "allow *", "osd": "allow *", "mds": "allow *", "mgr": "allow *"}
BOOTSTRAP_OSD_CAPS = {"mon": "profile bootstrap-osd", "mgr": "allow r"}


def check_block_device(
    path: str,
    *,
    mounts: str | None = None,
    sys_block: Path = Path("/sys/class/block"),
    mode_of: Callable[[str], int] = lambda p: os.stat(p).st_mode,
) -> str:
    """Refuse what must not become an OSD: not a block device, a partition, a disk with partitions or holders (LVM,
    RAID, dm-crypt), a mounted one. Returns the resolved device path. ``mounts`` (``/proc/self/mounts``'s text),
    ``sys_block`` and ``mode_of`` are parameters for tests."""
    real = os.path.realpath(path)
    try:
        mode = mode_of(real)
    except OSError as exc:
        raise CephError(f"{path}: {exc.strerror}; give the path of a whole disk such as /dev/sdb") from None
    if not stat.S_ISBLK(mode):
        raise CephError(f"{path} is not a block device; give a whole disk such as /dev/sdb (or use --file)")
    name = Path(real).name
    dev = sys_block / name
    if (dev / "partition").exists():
        raise CephError(f"{path} is a partition; give the whole disk, with nothing on it")
    if dev.is_dir() and any((dev / child / "partition").exists() for child in os.listdir(dev)):
        raise CephError(f"{path} has partitions; wipe it first (e.g. `wipefs -a {path}`) if its data may go")
    holders = dev / "holders"
    if holders.is_dir() and os.listdir(holders):
        raise CephError(f"{path} is in use by {', '.join(sorted(os.listdir(holders)))} (LVM, RAID or dm-crypt)")
    if mounts is None:
        mounts = Path("/proc/self/mounts").read_text()
    for line in mounts.splitlines():
        source = line.split(" ", 1)[0]
        if source.startswith("/dev/") and os.path.realpath(source) == real:
            raise CephError(f"{path} is mounted on {line.split(' ')[1]}; unmount it and wipe it first")
    return real


@dataclass(frozen=True)
class Daemon:
    type: str  # mon | mgr | osd
    id: str

    @property
    def name(self) -> str:
        return f"{self.type}.{self.id}"


class CephEngine:
    """This node's part of the cluster. Stateless apart from ``settings``: a new engine adopts what is running."""

    def __init__(self, settings: CephSettings) -> None:
        self.settings = settings
        self.conf_path = settings.root / "ceph.conf"
        self.admin_keyring = settings.root / "client.admin.keyring"
        self.bootstrap_osd_keyring = settings.root / "client.bootstrap-osd.keyring"

    # -- files -----------------------------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return self.settings.root

    def mon_dir(self) -> Path:
        return self.root / "mon" / f"ceph-{self.settings.node}"

    def mgr_dir(self) -> Path:
        return self.root / "mgr" / f"ceph-{self.settings.node}"

    def osd_dir(self, osd_id: int | str) -> Path:
        return self.root / "osd" / str(osd_id)

    def pid_file(self, d: Daemon) -> Path:
        return self.root / "run" / f"{d.name}.pid"

    def write_conf(self) -> None:
        """(Re)write ``ceph.conf`` and the directories it names; atomic."""
        for sub in ("run", "log", "crash", "mon", "mgr", "osd"):
            (self.root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        self.settings.socket_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_atomic(self.conf_path, render_conf(self.settings), 0o644)

    def _write_keyrings(self, keys: CephKeys) -> None:
        _write_atomic(self.admin_keyring, keyring_text("client.admin", keys.admin, ADMIN_CAPS), 0o600)
        _write_atomic(
            self.bootstrap_osd_keyring,
            keyring_text("client.bootstrap-osd", keys.bootstrap_osd, BOOTSTRAP_OSD_CAPS),
            0o600,
        )

    # -- running commands ------------------------------------------------------------------------------------------
    async def _run(self, *argv: str, input: bytes | None = None, timeout: float | None = None) -> bytes:
        """Run a command; its stdout, or :class:`CephError` with its stderr (never its stdin: keys go there)."""
        timeout = timeout or self.settings.cli_timeout
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError:
            raise CephError(
                f"{argv[0]} is not installed (Debian packages ceph-mon ceph-osd ceph-mgr ceph-common)"
            ) from None
        try:
            out, err = await asyncio.wait_for(proc.communicate(input), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise CephError(f"`{_show(argv)}` did not finish in {timeout:.0f} s") from None
        except asyncio.CancelledError:
            # A cancelled caller (an agent stopping, a leader's loop cancelled) must not leave a `ceph` command
            # waiting on MONs that may be gone.
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            text = err.decode(errors="replace").strip() or out.decode(errors="replace").strip()
            raise CephError(f"`{_show(argv)}` failed (exit {proc.returncode}): {_tail(text)}")
        return out

    async def ceph(self, *args: str, entity: str = "client.admin", timeout: float | None = None) -> Any:
        """``ceph ARGS --format json`` as ``entity``; the decoded JSON (None when it prints nothing)."""
        timeout = timeout or self.settings.cli_timeout
        keyring = self.admin_keyring if entity == "client.admin" else self.root / f"{entity}.keyring"
        out = await self._run(
            "ceph", "--conf", str(self.conf_path), "--name", entity, "--keyring", str(keyring),
            "--connect-timeout", str(max(1, int(timeout) - 1)), "--format", "json", *args,
            timeout=timeout,
        )  # fmt: skip
        text = out.decode().strip()
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return text

    # -- bootstrap -------------------------------------------------------------------------------------------------
    async def bootstrap(self) -> CephKeys:
        """Create the cluster's first MON and MGR on this node from nothing and start them; returns the new keys.

        Refuses (CephError) when this node already has MON data. Not atomic: a failed bootstrap leaves ``root``
        behind, which :meth:`destroy` removes before a retry."""
        s = self.settings
        if self.mon_dir().exists():
            raise CephError(f"{self.mon_dir()} exists: this node already has a monitor; remove it to bootstrap anew")
        self.write_conf()
        keys = CephKeys(mon=await self._gen_key(), admin=await self._gen_key(), bootstrap_osd=await self._gen_key())
        self._write_keyrings(keys)
        tmp = self.root / "run" / "bootstrap"
        tmp.mkdir(exist_ok=True, mode=0o700)
        mon_keyring = tmp / "mon.keyring"
        _write_atomic(
            mon_keyring,
            keyring_text("mon.", keys.mon, {"mon": "allow *"})
            + keyring_text("client.admin", keys.admin, ADMIN_CAPS)
            + keyring_text("client.bootstrap-osd", keys.bootstrap_osd, BOOTSTRAP_OSD_CAPS),
            0o600,
        )
        monmap = tmp / "monmap"
        await self._run(
            "monmaptool", "--create", "--clobber", "--fsid", s.fsid, "--enable-all-features",
            "--set-min-mon-release", "pacific", "--addv", s.node, s.mon_addrs(s.address), str(monmap),
        )  # fmt: skip
        await self._run(
            "ceph-mon", "--conf", str(self.conf_path), "--mkfs", "-i", s.node, "--monmap", str(monmap),
            "--keyring", str(mon_keyring), "--setuser", "root", "--setgroup", "root",
            timeout=s.start_timeout,
        )  # fmt: skip
        shutil.rmtree(tmp)
        await self._start(Daemon("mon", s.node))
        await self.ceph("config", "set", "global", "osd_pool_default_size", "1")
        await self.ceph("config", "set", "global", "osd_pool_default_min_size", "1")
        await self.ensure_mgr()
        return keys

    async def install_keys(self, keys: CephKeys) -> None:
        """Another node of an existing cluster: write ``ceph.conf`` and the keyrings from the cluster record."""
        self.write_conf()
        self._write_keyrings(keys)

    # -- more MONs ---------------------------------------------------------------------------------------------------
    def has_mon(self) -> bool:
        """Whether this node has MON data (it runs a MON)."""
        return (self.mon_dir() / "store.db").exists()

    def mon_running(self) -> bool:
        """Whether this node's MON daemon runs."""
        return self._find(Daemon("mon", self.settings.node)) is not None

    async def mon_names(self) -> list[str]:
        """The MONs of the cluster's monmap, by name (each is a node)."""
        dump = await self.ceph("mon", "dump")
        return [m["name"] for m in (dump or {}).get("mons", [])]

    async def quorum(self) -> list[str]:
        """The MONs in quorum now."""
        out = await self.ceph("quorum_status")
        return list((out or {}).get("quorum_names", []))

    async def add_mon(self, keys: CephKeys, *, timeout: float | None = None) -> None:
        """Make this node a MON of the running cluster (its conf must name the MONs that run): fetch the monmap from
        them, ``ceph-mon --mkfs`` with it and the shared ``mon.`` key, start it (bound to this node's address; it
        joins the monmap by itself) and wait until it is in the quorum; then a standby MGR here too.

        Idempotent: MON data already here is only started and waited for. The MON's data directory appears at once
        (made under another name, then renamed), so a crash half-way leaves nothing :meth:`daemons` would start."""
        s = self.settings
        d = Daemon("mon", s.node)
        if not self.has_mon():
            self.write_conf()
            self._write_keyrings(keys)
            tmp = self.root / "run" / "add-mon"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(mode=0o700)
            try:
                keyring = tmp / "mon.keyring"
                _write_atomic(keyring, keyring_text("mon.", keys.mon, {"mon": "allow *"}), 0o600)
                monmap = tmp / "monmap"
                await self.ceph("mon", "getmap", "-o", str(monmap))
                new = self.root / "mon" / f".new-ceph-{s.node}"
                shutil.rmtree(new, ignore_errors=True)
                await self._run(
                    "ceph-mon", "--conf", str(self.conf_path), "--mkfs", "-i", s.node, "--mon-data", str(new),
                    "--monmap", str(monmap), "--keyring", str(keyring), "--setuser", "root", "--setgroup", "root",
                    timeout=s.start_timeout,
                )  # fmt: skip
                shutil.rmtree(self.mon_dir(), ignore_errors=True)
                os.rename(new, self.mon_dir())
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        if self._find(d) is None:
            await self._start(d)
        await self._wait_quorum(s.node, timeout or s.start_timeout)
        await self.ensure_mgr()

    async def _wait_quorum(self, name: str, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = ""
        while True:
            try:
                if name in await self.quorum():
                    return
            except CephError as exc:
                last = f": {exc}"
            if loop.time() > deadline:
                raise CephError(
                    f"mon.{name} started but did not join the quorum in {timeout:.0f} s{last}; see "
                    f"{self.root / 'log'}/mon.{name}.log"
                )
            await asyncio.sleep(0.5)

    async def remove_mon(self, name: str) -> None:
        """Take MON ``name`` out of the monmap (the others keep quorum); when it is this node's, stop it and its MGR and
        delete their data. Idempotent. Refuses to remove the last MON."""
        names = await self.mon_names()
        if name in names:
            if len(names) == 1:
                raise CephError(f"mon.{name} is the cluster's only monitor; it cannot be removed")
            await self.ceph("mon", "remove", name)
        if name == self.settings.node:
            # Its MGR goes too (MGRs run where MONs do): the other MON nodes' MGRs stand by.
            mgr = Daemon("mgr", name)
            await self._signal_all(signal.SIGTERM, [Daemon("mon", name), mgr], 30)
            shutil.rmtree(self.mon_dir(), ignore_errors=True)
            if self.mgr_dir().exists():
                with contextlib.suppress(CephError):
                    await self.ceph("auth", "del", mgr.name)
                shutil.rmtree(self.mgr_dir(), ignore_errors=True)

    async def mon_bound_address(self) -> str | None:
        """The IP this node's running MON has in its monmap (asked over its admin socket, which needs no network:
        it answers whatever address the MON is on); None when it does not run or does not answer."""
        s = self.settings
        if not self.mon_running():
            return None
        try:
            out = await self._run("ceph", "--admin-daemon", str(s.socket_dir / f"mon.{s.node}.asok"), "mon_status")
            status = json.loads(out.decode() or "{}")
        except (CephError, ValueError):
            return None
        for mon in status.get("monmap", {}).get("mons", []):
            if mon.get("name") == s.node:
                for a in mon.get("public_addrs", {}).get("addrvec", []):
                    return str(a.get("addr", "")).rsplit(":", 1)[0].strip("[]") or None
        return None

    async def readdress_mon(self) -> bool:
        """Move this node's MON — the cluster's only one — to ``settings.address`` (storage enabled on a lone node,
        whose MON is on 127.0.0.1, before the cluster was formed): stop this node's daemons, rewrite the MON's own
        monmap (``--extract-monmap``, ``monmaptool --rm/--addv``, ``--inject-monmap``), write ``ceph.conf`` with
        the new address and start them all again (MGR and OSDs bind it too). Whether it moved anything; a MON
        already there is left alone. Refuses while the cluster has other MONs (they would have to agree)."""
        s = self.settings
        bound = await self.mon_bound_address()
        if bound is None or bound == s.address:
            return False
        tmp = self.root / "run" / "readdress"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        monmap = tmp / "monmap"
        try:
            await self.stop()
            conf = ("--conf", str(self.conf_path), "-i", s.node)
            await self._run("ceph-mon", *conf, "--extract-monmap", str(monmap), timeout=s.start_timeout)
            printed = (await self._run("monmaptool", "--print", str(monmap))).decode()
            others = [ln for ln in printed.splitlines() if ln.strip()[:1].isdigit() and f"mon.{s.node}" not in ln]
            if others:
                raise CephError(f"mon.{s.node} is not the only monitor ({len(others) + 1}); it cannot be moved alone")
            await self._run("monmaptool", "--rm", s.node, str(monmap))
            await self._run("monmaptool", "--addv", s.node, s.mon_addrs(s.address), str(monmap))
            await self._run("ceph-mon", *conf, "--inject-monmap", str(monmap), timeout=s.start_timeout)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            await self.ensure_running()  # with the new ceph.conf: every daemon binds the new address
        if self.mgr_dir().exists():
            # the MGR's metrics exporter was told the old address (see ensure_mgr): tell it the new one
            node = s.node
            await self.ceph("config", "set", "mgr", f"mgr/prometheus/{node}/server_addr", s.address, "--force")
            await self._signal_all(signal.SIGTERM, [Daemon("mgr", node)], 30)
            await self._start(Daemon("mgr", node))
        return True

    async def ensure_mgr(self) -> None:
        """Create this node's MGR (its key from the MONs) unless it exists, and make sure it runs."""
        d = self.mgr_dir()
        keyring = d / "keyring"
        if not keyring.exists():
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            # The metrics exporter binds every interface until told otherwise: this MGR's own address (the module's
            # "localized" option, per MGR: a standby on another node binds its own). (--force: the MONs learn a
            # module's options from a running MGR only.)
            node = self.settings.node
            for opt, value in (("server_addr", self.settings.address), ("server_port", self.settings.prometheus_port)):
                await self.ceph("config", "set", "mgr", f"mgr/prometheus/{node}/{opt}", str(value), "--force")
            entity = f"mgr.{node}"
            out = await self.ceph(
                "auth", "get-or-create", entity, "mon", "allow profile mgr", "osd", "allow *", "mds", "allow *"
            )  # fmt: skip
            _write_atomic(keyring, keyring_text(entity, out[0]["key"]), 0o600)
        if self._find(Daemon("mgr", self.settings.node)) is None:
            await self._start(Daemon("mgr", self.settings.node))

    async def _gen_key(self) -> str:
        return (await self._run("ceph-authtool", "--gen-print-key")).decode().strip()

    # -- daemons ---------------------------------------------------------------------------------------------------
    def daemons(self) -> list[Daemon]:
        """The daemons this node should run, from what is on disk (MON, MGR, then OSDs by id)."""
        out: list[Daemon] = []
        if (self.mon_dir() / "store.db").exists():
            out.append(Daemon("mon", self.settings.node))
        if (self.mgr_dir() / "keyring").exists():
            out.append(Daemon("mgr", self.settings.node))
        osd_root = self.root / "osd"
        if osd_root.is_dir():
            ids = sorted(int(p.name) for p in osd_root.iterdir() if p.name.isdigit() and (p / "ready").exists())
            out += [Daemon("osd", str(i)) for i in ids]
        return out

    def _matches(self, pid: int, d: Daemon) -> bool:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            return False
        if not argv or Path(argv[0]).name != f"ceph-{d.type}" or "--mkfs" in argv:
            return False
        return arg(argv, "--conf") == str(self.conf_path) and arg(argv, "-i") == d.id

    def _find(self, d: Daemon) -> int | None:
        """The pid of the running daemon ``d`` of this cluster, or None."""
        with contextlib.suppress(OSError, ValueError):
            pid = int(self.pid_file(d).read_text().strip())
            if self._matches(pid, d):
                return pid
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and self._matches(int(entry.name), d):
                return int(entry.name)
        return None

    def pids(self) -> dict[str, int]:
        """Daemon name → pid of each of this node's daemons that is running."""
        out = {}
        for d in self.daemons():
            pid = self._find(d)
            if pid is not None:
                out[d.name] = pid
        return out

    async def _start(self, d: Daemon, *extra: str) -> None:
        """Start ``d`` (it daemonizes; returns once it has initialised). A MON is told its address: one that is not
        in the monmap yet (joining) binds it and announces it (ignored once the monmap names it)."""
        with contextlib.suppress(FileNotFoundError):
            self.pid_file(d).unlink()
        if d.type == "mon":
            extra = ("--public-addrv", self.settings.mon_addrs(self.settings.address), *extra)
        await self._run(
            f"ceph-{d.type}", "--conf", str(self.conf_path), "-i", d.id, "--setuser", "root", "--setgroup", "root",
            *extra, timeout=self.settings.start_timeout,
        )  # fmt: skip

    async def ensure_running(self) -> list[str]:
        """Start each of this node's daemons that is not running (MON first); returns the names it started.

        Running daemons are left alone (a restarted agent adopts them). Raises CephError naming every daemon that
        failed to start, after trying all."""
        self.write_conf()
        started: list[str] = []
        errors: list[str] = []
        missing = [d for d in self.daemons() if self._find(d) is None]
        for d in [d for d in missing if d.type != "osd"]:
            try:
                await self._start(d)
                started.append(d.name)
            except CephError as exc:
                errors.append(f"{d.name}: {exc}")
        osds = [d for d in missing if d.type == "osd"]
        results = await asyncio.gather(*(self._start(d) for d in osds), return_exceptions=True)
        for d, res in zip(osds, results, strict=True):
            if isinstance(res, BaseException):
                errors.append(f"{d.name}: {res}")
            else:
                started.append(d.name)
        if errors:
            raise CephError("could not start " + "; ".join(errors))
        return started

    async def _signal_all(self, sig: int, daemons: Iterable[Daemon], timeout: float) -> None:
        pids = {}
        for d in daemons:
            pid = self._find(d)
            if pid is not None:
                pids[d.name] = pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        await wait_gone(pids.values(), timeout)

    async def stop(self, timeout: float = 30) -> None:
        """Stop this node's daemons (SIGTERM, SIGKILL after ``timeout``): OSDs first, the MON last."""
        ds = self.daemons()
        await self._signal_all(signal.SIGTERM, [d for d in ds if d.type == "osd"], timeout)
        await self._signal_all(signal.SIGTERM, [d for d in ds if d.type != "osd"], timeout)

    async def kill(self) -> None:
        """SIGKILL every daemon of this node at once (a crash, for tests)."""
        await self._signal_all(signal.SIGKILL, self.daemons(), 10)

    async def destroy(self) -> None:
        """Kill this node's daemons and delete all of ``root`` (and its socket directory): the node leaves Ceph."""
        await self.kill()
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.settings.socket_dir, ignore_errors=True)

    # -- OSDs ------------------------------------------------------------------------------------------------------
    async def add_osd_file(self, size_bytes: int) -> int:
        """Create an OSD on a sparse file of ``size_bytes`` under ``root/osd/<id>/block``, start it and wait until the
        MONs see it up; its id.

        Several may run at once. A failure removes what it made (the OSD id included)."""
        if size_bytes < 1 << 30:
            raise CephError(f"an OSD file needs at least 1 GiB (asked for {size_bytes} bytes)")
        return await self._add_osd(None, size_bytes)

    async def add_osd_device(self, path: str) -> int:
        """Create an OSD on the whole block device ``path`` (its contents are lost) and start it; its id.

        Refuses a path that is not a block device, is a partition, has partitions, holders or is mounted."""
        real = check_block_device(path)
        return await self._add_osd(real, 0)

    async def _add_osd(self, device: str | None, size_bytes: int) -> int:
        osd_uuid = str(uuid.uuid4())
        secret = await self._gen_key()
        self.root.joinpath("osd").mkdir(parents=True, exist_ok=True)
        params = self.root / "osd" / f".new-{osd_uuid}.json"
        _write_atomic(params, json.dumps({"cephx_secret": secret}), 0o600)
        try:
            out = await self.ceph("osd", "new", osd_uuid, "-i", str(params), entity="client.bootstrap-osd")
        finally:
            params.unlink(missing_ok=True)
        osd_id = int(out["osdid"] if isinstance(out, dict) else out)
        d = self.osd_dir(osd_id)
        try:
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(mode=0o700)
            _write_atomic(d / "keyring", keyring_text(f"osd.{osd_id}", secret), 0o600)
            extra: list[str] = []
            if device is not None:
                (d / "block").symlink_to(device)
            else:
                extra = ["--bluestore-block-size", str(size_bytes)]
            await self._run(
                "ceph-osd", "--conf", str(self.conf_path), "-i", str(osd_id), "--mkfs", "--osd-uuid", osd_uuid,
                "--setuser", "root", "--setgroup", "root", *extra, timeout=self.settings.start_timeout,
            )  # fmt: skip
            await self._start(Daemon("osd", str(osd_id)))
            await self._wait_osd_up(osd_id)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._signal_all(signal.SIGKILL, [Daemon("osd", str(osd_id))], 10)
                await self.ceph("osd", "purge", str(osd_id), "--yes-i-really-mean-it")
            shutil.rmtree(d, ignore_errors=True)
            raise
        return osd_id

    async def _wait_osd_up(self, osd_id: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.start_timeout
        while True:
            dump = await self.ceph("osd", "dump")
            if any(o["osd"] == osd_id and o["up"] for o in dump.get("osds", [])):
                return
            if loop.time() > deadline:
                raise CephError(f"osd.{osd_id} started but did not come up; see {self.root / 'log'}/osd.{osd_id}.log")
            await asyncio.sleep(0.2)

    async def remove_osd(self, osd_id: int, *, timeout: float = 3600) -> None:
        """Drain OSD ``osd_id`` (mark it out, wait until its data has moved: it is safe to destroy, or it is down and
        every PG is active+clean), stop it, purge it from the cluster and delete its directory (and file).

        Idempotent: an OSD that is already gone is success. Raises CephError after ``timeout`` seconds of draining."""
        existing = await self.ceph("osd", "ls")
        if osd_id in (existing or []):
            await self.ceph("osd", "out", str(osd_id))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while not await self._drained(osd_id):
                if loop.time() > deadline:
                    raise CephError(
                        f"osd.{osd_id} still holds data after {timeout:.0f} s; the others may be too full or down"
                    )
                await asyncio.sleep(0.5)
            await self._signal_all(signal.SIGTERM, [Daemon("osd", str(osd_id))], 30)
            await self.ceph("osd", "purge", str(osd_id), "--yes-i-really-mean-it")
        else:
            await self._signal_all(signal.SIGTERM, [Daemon("osd", str(osd_id))], 30)
        shutil.rmtree(self.osd_dir(osd_id), ignore_errors=True)

    async def _drained(self, osd_id: int) -> bool:
        try:
            out = await self.ceph("osd", "safe-to-destroy", str(osd_id))
        except CephError:
            out = None  # EAGAIN / EBUSY: not safe (yet)
        if isinstance(out, dict) and osd_id in out.get("safe_to_destroy", []):
            return True
        st = await self.status()
        osd = next((o for o in st.osds if o.id == osd_id), None)
        return st.ready and (osd is None or not osd.up)

    # -- pools -----------------------------------------------------------------------------------------------------
    async def _rule(self, size: int) -> str:
        """The CRUSH rule pools of ``size`` copies use (:func:`crush_rule`), created when missing."""
        name, domain = crush_rule(*crush_counts(await self.ceph("osd", "tree")), size)
        await self.ceph("osd", "crush", "rule", "create-replicated", name, "default", domain)
        return name

    async def pools(self) -> dict[str, dict[str, Any]]:
        """Pool name → ``ceph osd pool ls detail`` entry."""
        return {p["pool_name"]: p for p in await self.ceph("osd", "pool", "ls", "detail")}

    async def ensure_pool(self, name: str, *, application: str = "rbd", pg_num: int = 32) -> None:
        """Create the replicated pool ``name`` unless it exists (with the cluster's replica count and CRUSH rule) and
        enable ``application`` on it."""
        existing = await self.pools()
        if name not in existing:
            rule = await self._rule(max((int(p.get("size", 1)) for p in existing.values()), default=1))
            await self.ceph("osd", "pool", "create", name, str(pg_num), str(pg_num), "replicated", rule)
        await self.ceph("osd", "pool", "application", "enable", name, application, "--yes-i-really-mean-it")

    async def set_replicas(self, size: int) -> None:
        """Every pool (and each future one) keeps ``size`` copies, ``max(1, size - 1)`` needed to serve I/O, placed
        on distinct hosts once two hosts have OSDs (else on distinct OSDs)."""
        if not 1 <= size <= 10:
            raise CephError(f"replicas must be 1 to 10, not {size}")
        min_size = max(1, size - 1)
        await self.ceph("config", "set", "global", "osd_pool_default_size", str(size))
        await self.ceph("config", "set", "global", "osd_pool_default_min_size", str(min_size))
        rule = await self._rule(size)
        for name, p in (await self.pools()).items():
            if p.get("size") != size:
                args = ["--yes-i-really-mean-it"] if size == 1 else []
                await self.ceph("osd", "pool", "set", name, "size", str(size), *args)
            if p.get("min_size") != min_size:
                await self.ceph("osd", "pool", "set", name, "min_size", str(min_size))
            await self.ceph("osd", "pool", "set", name, "crush_rule", rule)

    # -- status, fencing -------------------------------------------------------------------------------------------
    async def status(self) -> CephStatus:
        """The cluster's state in figures and plain words (raises CephError when no MON answers)."""
        st, tree, mons, pools = await asyncio.gather(
            self.ceph("status"),
            self.ceph("osd", "df", "tree"),
            self.ceph("mon", "dump"),
            self.ceph("osd", "pool", "ls", "detail"),
        )
        return status_from_json(st, tree, mons, pools)

    async def wait_ready(self, timeout: float) -> CephStatus:
        """Wait until every PG is active+clean (HEALTH_OK is not readiness: it shows while PGs still peer)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: CephStatus | str = "no answer from the monitors"
        while True:
            try:
                last = await self.status()
                if last.ready:
                    return last
            except CephError as exc:
                last = str(exc)
            if loop.time() > deadline:
                summary = last if isinstance(last, str) else last.summary
                raise CephError(f"Ceph is not ready after {timeout:.0f} s: {summary}")
            await asyncio.sleep(0.25)

    async def blocklist_add(self, addr: str, *, expire_seconds: float = 3600) -> None:
        """Fence clients: ``addr`` is an IP (every client on it) or ``IP:port/nonce``; refused by the OSDs until
        removed or ``expire_seconds`` pass."""
        await self.ceph("osd", "blocklist", "add", addr, str(expire_seconds))

    async def blocklist_rm(self, addr: str) -> None:
        await self.ceph("osd", "blocklist", "rm", addr)

    async def blocklist_ls(self) -> list[str]:
        """The fenced addresses (``IP:port/nonce``; ``IP:0/0`` fences every client on the IP)."""
        out = await self.ceph("osd", "blocklist", "ls")
        # Pacific prints two JSON lists back to back (addresses, then ranges): take the first.
        if isinstance(out, str):
            out = json.JSONDecoder().raw_decode(out)[0]
        return [e["addr"] for e in out or []]


# -- helpers -----------------------------------------------------------------------------------------------------------


def _write_atomic(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _show(argv: tuple[str, ...] | list[str]) -> str:
    """A command for an error message: the program and its verbs, without the options naming files."""
    skip = {"--conf", "--keyring", "--name", "--connect-timeout", "--format", "--setuser", "--setgroup"}
    out: list[str] = []
    it = iter(argv)
    for a in it:
        if a in skip:
            next(it, None)
            continue
        out.append(a)
    return " ".join(out[:8]) + (" …" if len(out) > 8 else "")


def _tail(text: str, limit: int = 1500) -> str:
    return text if len(text) <= limit else "…" + text[-limit:]
