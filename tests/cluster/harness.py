"""Multi-node test harness: real agents, each in its own network namespace, joined by a bridge in a "switch" namespace.

One :class:`Cluster` (``c`` = cluster number within this process, ``k`` = node number from 1)::

    netns mcs<pid>x<c>                    netns mcn<pid>x<c>n<k>
    br0 ─┬─ v1 ══════ veth ══════ eth0 10.77.<c>.1/24, lo    ← `minicloud agent --listen 10.77.<c>.1:8443`
         ├─ v2 ══════ veth ══════ eth0 10.77.<c>.2/24, lo
         └─ v3 ══════ veth ══════ eth0 10.77.<c>.3/24, lo

Rules the harness keeps:

* Nothing is created in the host's network namespace. Each veth pair is created from inside the switch namespace with
  its peer placed straight into the node namespace, so interface names only have to be unique inside one namespace
  and no traffic can leave the namespaces we made. The host cannot reach ``10.77.*``; talk to the agents through their
  Unix sockets (filesystem paths work from any network namespace) or from inside a node (``node.exec``/``node.curl``).
* Namespace names carry this process's pid and a per-process counter, so two pytest-xdist workers never collide.
* Before a namespace is created its owner (pid and the pid's start time) is recorded in
  ``/run/minicloud-test/<netns>.json``. :func:`cleanup_stale` removes only namespaces that have such a record *and*
  whose owner is gone (crashed or SIGKILLed test runs), killing what still runs inside them; namespaces without a
  record are never touched.
* ``Cluster.close()`` (also run from ``atexit``) kills the agents and every process left in the namespaces, deletes the
  veth pairs synchronously and removes the namespaces, continuing past individual failures.

Real hosts (``Cluster(..., libvirt=True)``): each node also gets **its own libvirtd** (:class:`NodeLibvirt`), so the
QEMU guests its agent starts have their taps in that node's namespace only. A *holder* process (``sleep infinity``)
sits in the node's network namespace and in a private mount namespace where ``<root>/libvirt/<name>`` directories
are bind-mounted over ``/run/libvirt``, ``/var/lib/libvirt``, ``/var/cache/libvirt``, ``/var/log/libvirt``,
``/run/lock``, ``/etc/libvirt`` (a copy without the host's domains and networks, with ``cgroup_controllers = [ ]`` so
two nodes' QEMUs never collide in the host's cgroup tree) and ``/run/netns`` (the agent's named namespaces, e.g. its
service namespaces ``mcs-<vni>``, are the node's own and vanish with it); sysfs is remounted to show the node's
devices. libvirtd, the agent and :meth:`Node.exec` all run there (``nsenter -t HOLDER --mount --net``; ``ip netns
exec`` would make yet another mount namespace). The agent's ``compute.libvirt_uri`` is
``qemu+unix:///system?socket=<root>/libvirt/run/libvirt-sock``, which the root namespace reaches too (a filesystem
path). The QEMU capabilities probe (~8 s) runs once per test process; every later libvirtd starts from a copy of its
cache. Closing a node destroys its guests before it kills its libvirtd (QEMU would outlive it); a crashed run's
libvirtd and guests live in its node's namespace, so :func:`cleanup_stale` removes them with it.

Public LAN (``Cluster(..., public=True)``): a namespace ``mcp<id>`` plays the upstream network: a bridge ``br0``
holding :data:`PUBLIC_GATEWAY` (the "internet router" a node's SNAT leads to), and every node's ``eth1`` (no address:
the provider interface a public network maps to, ``[network.providers]``) plugged into it.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from minicloud.client import Client

REPO = Path(__file__).resolve().parents[2]
RUN_DIR = Path("/run/minicloud-test")  # owner records and the lock that serialises `ip netns add/del`
NETNS_RE = re.compile(r"^mc[snp](?P<pid>\d+)x\d+(n\d+)?$")
SUBNET = "10.77"
AGENT_PORT = 8443
BRIDGE = "br0"
PUBLIC_CIDR = "198.51.100.0/24"  # TEST-NET-2: the public LAN of every cluster (each in its own namespace)
PUBLIC_GATEWAY = "198.51.100.1"
#: What each node's libvirtd gets privately, bind-mounted over the host's path: <root>/libvirt/<name> → path.
LIBVIRT_MOUNTS = {
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
    "lock": "/run/lock",
    "etc": "/etc/libvirt",
    # Named network namespaces (`ip netns`, pyroute2): a node's agent names its service namespaces mcs-<vni>, the
    # same on every node; each node keeps its own, and they go when the node's mount namespace goes.
    "netns": "/run/netns",
}

T = TypeVar("T")


class HarnessError(RuntimeError):
    """A command the harness needs failed (output included)."""


# -- small helpers -----------------------------------------------------------------------------------------------------


def wait_for(
    predicate: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"
) -> T:
    """Call ``predicate`` until it returns something truthy and return that; raise ``TimeoutError`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def ip(*args: str, check: bool = True, timeout: float = 15) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` (iproute2)."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise HarnessError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def netns_list() -> list[str]:
    """Names of the network namespaces `ip netns` knows (all of them, not only ours)."""
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(name: str) -> list[int]:
    out = ip("netns", "pids", name, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()[19]


@contextlib.contextmanager
def _netns_lock() -> Iterator[None]:
    """Serialise `ip netns add/del` between processes: the first `add` sets up /run/netns and concurrent ones race."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with (RUN_DIR / ".lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def guest_slot() -> Iterator[None]:
    """Hold the host's one slot for tests that boot guests: pytest-xdist workers take turns, so however the tests
    are spread over workers, one guest test runs at a time (and it keeps to two guests: TCG on two cores)."""
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with (RUN_DIR / ".guests.lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _owner_file(netns: str) -> Path:
    return RUN_DIR / f"{netns}.json"


def create_netns(name: str) -> None:
    """Record this process as the owner of ``name``, then create the namespace (with ``lo`` up)."""
    if not NETNS_RE.match(name):
        raise ValueError(f"{name!r} does not follow the harness's naming scheme {NETNS_RE.pattern}")
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    record = _owner_file(name)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "start": _start_time(os.getpid())}) + "\n")
    os.replace(tmp, record)
    try:
        with _netns_lock():
            ip("netns", "add", name)
        ip("-n", name, "link", "set", "lo", "up")
    except BaseException:
        with contextlib.suppress(Exception):
            delete_netns(name)
        raise


def _kill_all_in(name: str, timeout: float = 5.0) -> None:
    """SIGKILL every process in the namespace and wait until none is left (zombies no longer count)."""
    deadline = time.monotonic() + timeout
    while pids := netns_pids(name):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise HarnessError(f"processes {pids} in netns {name} survive SIGKILL")
        time.sleep(0.02)


def delete_netns(name: str) -> None:
    """Kill what runs in the namespace, delete it, and drop its owner record. Missing namespaces are fine."""
    if name in netns_list():
        _kill_all_in(name)
        with _netns_lock():
            result = ip("netns", "del", name, check=False)
        if result.returncode != 0 and name in netns_list():
            raise HarnessError(f"ip netns del {name} failed: {result.stderr.strip()}")
    _owner_file(name).unlink(missing_ok=True)


def _owner_alive(record: Path) -> bool:
    try:
        owner = json.loads(record.read_text())
        pid, start = int(owner["pid"]), owner["start"]
    except (OSError, ValueError, KeyError, TypeError):
        return True  # unreadable (maybe being written): leave it alone
    return _start_time(pid) == start


def cleanup_stale() -> list[str]:
    """Remove namespaces recorded under /run/minicloud-test whose owner process is gone; return their names.

    Only names following our scheme that have an owner record are considered; a live owner's (another xdist worker's,
    or this process's) are kept. Processes left inside a stale namespace (orphaned agents) are killed first.
    """
    if not RUN_DIR.is_dir():
        return []
    removed = []
    for record in sorted(RUN_DIR.glob("*.json")):
        name = record.stem
        if not NETNS_RE.match(name) or _owner_alive(record):
            continue
        with contextlib.suppress(HarnessError):  # another worker may be removing the same one
            if name in netns_list():
                removed.append(name)
            delete_netns(name)
        with contextlib.suppress(FileNotFoundError):
            Path(f"/tmp/mclv-{name}").unlink()  # a crashed node's short link to its libvirt directory
    return removed


_cleaned_in_this_process = False


def cleanup_stale_once() -> None:
    global _cleaned_in_this_process
    if not _cleaned_in_this_process:
        _cleaned_in_this_process = True
        cleanup_stale()


def unavailable_reason() -> str | None:
    """Why the harness cannot run here (not root, no iproute2, no netns/bridge/veth), or None when it can."""
    if os.geteuid() != 0:
        return "the cluster harness needs root to create network namespaces (ip netns add)"
    if shutil.which("ip") is None:
        return "the cluster harness needs iproute2 (`ip`) to create network namespaces"
    probe = f"mcs{os.getpid()}x0"
    try:
        try:
            create_netns(probe)
        except (HarnessError, OSError) as exc:
            return f"the cluster harness needs network namespaces, but `ip netns add` failed: {exc}"
        for what, args in (
            ("a Linux bridge", ("link", "add", BRIDGE, "type", "bridge")),
            ("veth pairs", ("link", "add", "v0", "type", "veth", "peer", "name", "v1")),
        ):
            result = ip("-n", probe, *args, check=False)
            if result.returncode != 0:
                return f"the cluster harness needs {what} inside a network namespace: {result.stderr.strip()}"
        return None
    finally:
        with contextlib.suppress(Exception):
            delete_netns(probe)


def libvirt_unavailable_reason() -> str | None:
    """Why nodes cannot run their own libvirtd and QEMU guests here, or None when they can."""
    for tool, package in (
        ("libvirtd", "libvirt-daemon"),
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("nsenter", "util-linux"),
        ("unshare", "util-linux"),
    ):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"real cluster hosts need {tool} (Debian package {package})"
    if not Path("/etc/libvirt/qemu.conf").exists():
        return "real cluster hosts need libvirtd's /etc/libvirt/qemu.conf (Debian package libvirt-daemon-driver-qemu)"
    try:
        import pwd

        pwd.getpwnam("libvirt-qemu")
    except KeyError:
        return "real cluster hosts need libvirtd's libvirt-qemu user (Debian package libvirt-daemon-driver-qemu)"
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return "real cluster hosts need the libvirt Python binding (libvirt-python, the agent extra)"
    return None


# -- topology ----------------------------------------------------------------------------------------------------------


class Switch:
    """A namespace ``mcs<id>`` holding the bridge ``br0`` that the nodes' veth pairs plug into."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.ports: list[str] = []
        create_netns(netns)
        try:
            # STP off and no forwarding delay: a port forwards as soon as it is up (partition/heal take effect at once).
            ip("-n", netns, "link", "add", BRIDGE, "type", "bridge", "stp_state", "0", "forward_delay", "0")
            ip("-n", netns, "link", "set", BRIDGE, "up")
        except BaseException:
            self.close()
            raise

    def plug(self, port: str, peer_netns: str, peer_name: str = "eth0") -> None:
        """Create a veth pair: ``port`` on the bridge here, ``peer_name`` inside ``peer_netns`` (both up on return)."""
        ip("-n", self.netns, "link", "add", port, "type", "veth", "peer", "name", peer_name, "netns", peer_netns)
        self.ports.append(port)
        ip("-n", self.netns, "link", "set", port, "master", BRIDGE)
        ip("-n", self.netns, "link", "set", port, "up")

    def set_port(self, port: str, up: bool) -> None:
        ip("-n", self.netns, "link", "set", port, "up" if up else "down")

    def unplug(self, port: str) -> None:
        """Delete the veth pair (both ends, synchronously)."""
        if port in self.ports:
            self.ports.remove(port)
            ip("-n", self.netns, "link", "del", port, check=False)

    def close(self) -> None:
        for port in list(self.ports):
            self.unplug(port)
        delete_netns(self.netns)


class PublicLan(Switch):
    """The upstream LAN: a namespace ``mcp<id>`` whose bridge ``br0`` holds :data:`PUBLIC_GATEWAY`; nodes plug their
    ``eth1`` into it (:meth:`Switch.plug`)."""

    def __init__(self, netns: str) -> None:
        super().__init__(netns)
        try:
            prefixlen = PUBLIC_CIDR.split("/")[1]
            ip("-n", netns, "addr", "add", f"{PUBLIC_GATEWAY}/{prefixlen}", "dev", BRIDGE)
        except BaseException:
            self.close()
            raise

    def exec(self, *cmd: object, timeout: float = 30, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a command inside the public namespace (output captured as text)."""
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, *map(str, cmd)], capture_output=True, text=True, timeout=timeout, **kw
        )


def plug_lan_bridge(public: PublicLan, node: Any, bridge: str = "lanbr", ifname: str = "eth2") -> None:
    """Give ``node`` a Linux bridge ``bridge`` on the public LAN (its port ``ifname``, a veth into the LAN's
    switch): the provider of NICs straight on the LAN (``[network.providers] PHYSNET = "lanbr"``), Proxmox's vmbr0."""
    public.plug(f"q{port_number(node.port)}", node.netns, ifname)
    for cmd in (
        ("link", "add", bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0"),
        ("link", "set", ifname, "master", bridge),
        ("link", "set", ifname, "up"),
        ("link", "set", bridge, "up"),
    ):
        ip("-n", node.netns, *cmd)


def port_number(port: str) -> str:
    """``v3`` → ``3``: a node's number from its switch port's name."""
    return port.lstrip("v")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X")


_caps_lock = threading.Lock()
_caps_seed: Path | None = None


def _qemu_caps_seed() -> Path:
    """This process's copy of a probed ``/var/cache/libvirt/qemu`` (empty until the first libvirtd has probed)."""
    global _caps_seed
    with _caps_lock:
        if _caps_seed is None:
            import tempfile

            _caps_seed = Path(tempfile.mkdtemp(prefix="minicloud-qemu-caps-"))
            atexit.register(shutil.rmtree, _caps_seed, True)
        return _caps_seed


#: The longest Unix socket path we let libvirt use (the kernel's limit is 107 bytes plus the terminating NUL).
SOCKET_PATH_MAX = 100


class NodeLibvirt:
    """A libvirtd private to one node (see the module docstring): :meth:`start` it after the node's namespace
    exists; :meth:`stop` destroys its guests, then kills it and the holder. Idempotent; never raises from stop()
    for what is already gone."""

    def __init__(self, netns: str, root: Path) -> None:
        self.netns = netns
        self.root = root  # <node root>/libvirt
        self.holder: subprocess.Popen[bytes] | None = None
        self._link: Path | None = None
        if len(str(root / "run" / "libvirt-sock")) > SOCKET_PATH_MAX:
            # A Unix socket path has at most 107 bytes; pytest's temporary directories under xdist run longer. Reach
            # the directory through a short link instead (removed by stop() or, after a crash, by cleanup_stale()).
            root.mkdir(parents=True, exist_ok=True)
            self._link = Path(f"/tmp/mclv-{netns}")
            with contextlib.suppress(FileNotFoundError):
                self._link.unlink()
            self._link.symlink_to(root)
            self.root = self._link
        self.socket = self.root / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def holder_pid(self) -> int | None:
        return self.holder.pid if self.holder is not None and self.holder.poll() is None else None

    def _prepare(self) -> None:
        for name in LIBVIRT_MOUNTS:
            if name != "etc":
                (self.root / name).mkdir(parents=True, exist_ok=True)
        etc = self.root / "etc"
        if not etc.exists():
            # The host's configuration files, none of its state: its persistent domains (etc/qemu/*.xml), secrets
            # and libvirt-managed networks (they need iptables and would autostart virbr0; we build our own bridges).
            shutil.copytree("/etc/libvirt", etc, symlinks=True, ignore=shutil.ignore_patterns("qemu", "secrets"))
            (etc / "qemu").mkdir()
            with (etc / "qemu.conf").open("a") as f:
                f.write(
                    "\n# minicloud test node: guests as root, no virtlogd, no cgroups (shared host tree)\n"
                    'user = "root"\ngroup = "root"\nstdio_handler = "file"\ncgroup_controllers = [ ]\n'
                )
        caps = self.root / "cache" / "qemu"
        seed = _qemu_caps_seed()
        if any(seed.iterdir()) and not caps.exists():
            shutil.copytree(seed, caps)

    def start(self, timeout: float = 60) -> NodeLibvirt:
        """Start the holder and libvirtd; return once libvirtd answers (and its QEMU capabilities are cached)."""
        import libvirt

        self._prepare()
        ready = self.root / "holder.ready"
        ready.unlink(missing_ok=True)
        mounts = " ".join(
            f"mkdir -p {target} && mount --bind {self.root / name} {target} &&"
            for name, target in LIBVIRT_MOUNTS.items()
        )
        script = (
            f"set -e; {mounts} true; "
            # sysfs as the node sees it (libvirt reads /sys/class/net), then cgroup2 back over it.
            "mount -t sysfs sysfs /sys; mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null || true; "
            f"touch {ready}; exec sleep infinity"
        )
        self.holder = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount", "--propagation", "private", "--",
             "sh", "-c", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=(self.root / "holder.log").open("wb"),
        )  # fmt: skip
        wait_for(lambda: ready.exists() or self.holder.poll() is not None, timeout=timeout, what="the holder")  # type: ignore[union-attr]
        if self.holder.poll() is not None:
            raise HarnessError(f"{self.netns}: the mount holder failed: {(self.root / 'holder.log').read_text()}")
        run = self.exec("libvirtd", "-d", "-p", f"{LIBVIRT_MOUNTS['run']}/libvirtd.pid", timeout=timeout)
        if run.returncode != 0:
            raise HarnessError(f"{self.netns}: libvirtd failed to start: {run.stderr.strip()}\n{self.log_tail()}")
        wait_for(self.socket.exists, timeout=timeout, what=f"{self.socket}")
        conn = libvirt.open(self.uri)
        try:
            conn.getCapabilities()  # probes QEMU unless the seeded cache is valid
        finally:
            conn.close()
        seed = _qemu_caps_seed()
        with _caps_lock:
            if not any(seed.iterdir()) and (self.root / "cache" / "qemu").is_dir():
                shutil.copytree(self.root / "cache" / "qemu", seed, dirs_exist_ok=True)
        return self

    def exec(self, *cmd: object, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a command inside the node, in the holder's mount namespace."""
        assert self.holder_pid is not None, "start() first"
        return subprocess.run(
            ["nsenter", "-t", str(self.holder_pid), "--mount", "--net", *map(str, cmd)],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return (self.root / "log" / "libvirtd.log").read_text(errors="replace")[-chars:]
        except OSError:
            return "(no libvirtd log)"

    def pid(self) -> int | None:
        try:
            return int((self.root / "run" / "libvirtd.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def domains(self) -> list[str]:
        """Names of the domains this libvirtd knows (running or not)."""
        import libvirt

        conn = libvirt.open(self.uri)
        try:
            return sorted(d.name() for d in conn.listAllDomains(0))
        finally:
            conn.close()

    def destroy_guests(self) -> None:
        """Destroy (in parallel: ~1.5 s each) and undefine every domain of this libvirtd."""
        import libvirt

        if not self.socket.exists():
            return
        conn = libvirt.open(self.uri)
        try:
            doms = conn.listAllDomains(0)

            def destroy(dom: Any) -> None:
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isActive():
                        dom.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)

            threads = [threading.Thread(target=destroy, args=(d,)) for d in doms]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        finally:
            conn.close()

    def stop(self) -> None:
        errors = []
        if self.holder_pid is not None:
            try:
                self.destroy_guests()
            except Exception as exc:  # a dead libvirtd: its QEMUs die with the namespace
                errors.append(f"destroying guests: {exc}")
        pid = self.pid()
        if pid is not None and alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            try:
                wait_for(lambda: not alive(pid), timeout=10, what="libvirtd to exit")
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.holder is not None:
            if self.holder.poll() is None:
                self.holder.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.holder.wait(5)
        if self._link is not None:
            with contextlib.suppress(FileNotFoundError):
                self._link.unlink()
        if errors:
            raise HarnessError("; ".join(errors))


class Node:
    """A namespace ``mcn<id>`` with ``lo`` and ``eth0`` (``ADDRESS/PREFIX``), its veth peer on the switch's bridge."""

    def __init__(self, switch: Switch, netns: str, address: str, *, prefixlen: int = 24, port: str = "v0") -> None:
        self.switch = switch
        self.netns = netns
        self.address = address
        self.prefixlen = prefixlen
        self.port = port  # the switch-side end of the veth pair
        self.partitioned = False
        self._procs: list[subprocess.Popen[Any]] = []
        create_netns(netns)
        try:
            switch.plug(port, netns, "eth0")
            ip("-n", netns, "addr", "add", f"{address}/{prefixlen}", "dev", "eth0")
            ip("-n", netns, "link", "set", "eth0", "up")
        except BaseException:
            Node.close(self)
            raise

    @property
    def ip(self) -> str:
        return self.address

    #: Set on nodes with their own libvirtd: commands enter its holder's mount namespace too.
    libvirt: NodeLibvirt | None = None

    def _cmd(self, cmd: Sequence[object]) -> list[str]:
        if self.libvirt is not None and (holder := self.libvirt.holder_pid) is not None:
            return ["nsenter", "-t", str(holder), "--mount", "--net", *map(str, cmd)]
        return ["ip", "netns", "exec", self.netns, *map(str, cmd)]

    def exec(
        self, *cmd: object, timeout: float = 30, check: bool = False, **kw: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run a command inside the node's namespace; output captured as text unless told otherwise."""
        if "stdout" not in kw and "stderr" not in kw:
            kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(self._cmd(cmd), timeout=timeout, check=check, **kw)

    def popen(self, *cmd: object, **kw: Any) -> subprocess.Popen[Any]:
        """Start a command inside the node's namespace; it is killed when the node closes."""
        proc = subprocess.Popen(self._cmd(cmd), **kw)
        self._procs.append(proc)
        return proc

    def curl(self, url: str, *args: str, timeout: float = 3.0) -> subprocess.CompletedProcess[str]:
        """``curl -sSk --max-time TIMEOUT ARGS URL`` from inside this node (no certificate check)."""
        return self.exec("curl", "-sSk", "--max-time", f"{timeout:g}", *args, url, timeout=timeout + 10)

    def reachable(self, url: str, timeout: float = 2.0) -> bool:
        """Whether ``url`` answers with a 2xx status from inside this node within ``timeout`` seconds."""
        return self.curl(url, "-f", "-o", "/dev/null", timeout=timeout).returncode == 0

    def partition(self) -> None:
        """Cut this node off from every other node (its switch port goes down); its own loopback keeps working."""
        self.switch.set_port(self.port, up=False)
        self.partitioned = True

    def heal(self) -> None:
        self.switch.set_port(self.port, up=True)
        self.partitioned = False

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self._procs.clear()
        self.switch.unplug(self.port)
        delete_netns(self.netns)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.netns} {self.address}>"


class AgentNode(Node):
    """A :class:`Node` running ``minicloud agent`` (not started until :meth:`start`), with its own directory ``root``.

    ``extra_args`` (appended after ``agent ...``) and ``extra_env`` are read at every start, so tests and later
    features (clustering flags, join tokens) can change them between restarts.
    """

    def __init__(
        self,
        switch: Switch,
        netns: str,
        address: str,
        root: Path,
        *,
        node_name: str,
        listen_port: int = AGENT_PORT,
        extra_args: Sequence[str] = (),
        extra_env: dict[str, str] | None = None,
        libvirt: bool = False,
        public: PublicLan | None = None,
        **kw: Any,
    ) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.socket = root / "run" / "minicloud.sock"
        self.log = root / "agent.log"
        self.config = root / "minicloud.toml"
        self.node_name = node_name
        self.listen_port = listen_port
        self.extra_args: list[str] = list(extra_args)
        self.extra_env: dict[str, str] = dict(extra_env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}
        self.image_dir = root / "images"  # compute.image_dirs: copy guest images here to import them on this node
        root.mkdir(parents=True, exist_ok=True)
        if libvirt:
            self.libvirt = NodeLibvirt(netns, root / "libvirt")
        if not self.config.exists():
            self.config.write_text(self.compute_config() if libvirt else self.NO_COMPUTE)
        super().__init__(switch, netns, address, **kw)
        try:
            if public is not None:
                public.plug(f"p{port_number(self.port)}", netns, "eth1")
                ip("-n", netns, "link", "set", "eth1", "up")
            if self.libvirt is not None:
                self.libvirt.start()
        except BaseException:
            self.close()
            raise

    NO_COMPUTE = '# no compute in the cluster tests\n[compute]\ndriver = "none"\n'

    def compute_config(self) -> str:
        """Real compute against this node's own libvirtd (TCG); images importable from :attr:`image_dir`."""
        assert self.libvirt is not None
        self.image_dir.mkdir(parents=True, exist_ok=True)
        return (
            "# a real host of the cluster tests: its own libvirtd, TCG guests\n"
            f'[compute]\ndriver = "libvirt"\nvirt_type = "qemu"\nlibvirt_uri = "{self.libvirt.uri}"\n'
            f'image_dirs = ["{self.image_dir}"]\nstop_timeout = 5.0\n'
            # Capacity is republished every resync: after a join the cluster's store learns it within seconds.
            "resync_interval = 5.0\n"
        )

    # -- environment -----------------------------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """The environment of the agent and of :meth:`cli`: inherited, minus MINICLOUD_*, plus ours and extra_env."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MINICLOUD_")}
        env.update(
            MINICLOUD_CONFIG=str(self.config),
            XDG_CONFIG_HOME=str(self.root / "client-config"),
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        return env

    @property
    def listen(self) -> str:
        return f"{self.address}:{self.listen_port}"

    @property
    def https_url(self) -> str:
        return f"https://{self.listen}"

    @property
    def ca_pem(self) -> str:
        return (self.data_dir / "pki" / "ca.crt").read_text()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def spawn(self) -> None:
        """Start the agent process without waiting for it (see :meth:`wait_ready`)."""
        if self.running:
            raise HarnessError(f"{self.node_name}: the agent is already running (pid {self.proc.pid})")  # type: ignore[union-attr]
        (self.data_dir / "agent.json").unlink(missing_ok=True)
        self.info = {}
        # `--socket` is a global option: it goes before the `agent` subcommand.
        cmd = [sys.executable, "-m", "minicloud", "--socket", str(self.socket), "agent"]
        cmd += ["--data-dir", str(self.data_dir), "--listen", self.listen, "--node-name", self.node_name]
        cmd += self.extra_args
        with self.log.open("ab") as log:
            log.write(f"\n--- harness: starting {' '.join(cmd)} in netns {self.netns}\n".encode())
            log.flush()
            # `ip netns exec` execs the command, so proc.pid is the agent's pid.
            self.proc = subprocess.Popen(
                self._cmd(cmd), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env, cwd=REPO
            )

    def wait_ready(self, timeout: float = 30) -> AgentNode:
        """Wait until ``data/agent.json`` names this process (the agent is serving); raise with the log otherwise."""
        assert self.proc is not None, "spawn() first"
        state = self.data_dir / "agent.json"
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise HarnessError(f"{self.node_name}: agent exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                info = json.loads(state.read_text())
                if info["pid"] == self.proc.pid:
                    self.info = info
                    return self
            except (FileNotFoundError, ValueError, KeyError):
                pass
            if time.monotonic() >= deadline:
                raise HarnessError(f"{self.node_name}: agent not ready after {timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def start(self, timeout: float = 30) -> AgentNode:
        self.spawn()
        return self.wait_ready(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        """Send ``sig`` (SIGTERM: graceful) and wait for the exit; return the exit status (None if never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise HarnessError(f"{self.node_name}: agent ignored signal {sig} for {timeout:g} s") from None

    def kill(self) -> int | None:
        """SIGKILL the agent (a crash: no clean shutdown) and wait for it."""
        return self.stop(signal.SIGKILL)

    def crash(self) -> None:
        """The whole node dies at once: SIGKILL every process in its namespace (the agent and the etcd it runs; on a
        real host also its libvirtd, guests and mount holder, so its compute cannot be started again)."""
        _kill_all_in(self.netns)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)

    def restart(self, timeout: float = 30) -> AgentNode:
        self.stop()
        return self.start(timeout)

    # -- talking to it ---------------------------------------------------------------------------------------------
    def cli(
        self, *args: str, input: str | None = None, check: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run ``minicloud --socket SOCK ARGS`` from the host namespace (the Unix socket is a filesystem path)."""
        cmd = [sys.executable, "-m", "minicloud", "--socket", str(self.socket), *args]
        result = subprocess.run(
            cmd, capture_output=True, text=True, input=input, env=self.env, timeout=timeout, cwd=REPO
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.cli("-o", "json", *args, check=True).stdout)

    def client(self, **kw: Any) -> Client:
        """An SDK client on this agent's Unix socket (works from the host namespace)."""
        return Client.local(str(self.socket), **kw)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    def close(self) -> None:
        """Kill the agent, destroy the guests and stop libvirtd (if any), then remove the namespace."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        try:
            if self.libvirt is not None:
                self.libvirt.stop()
        finally:
            super().close()


# -- clusters ----------------------------------------------------------------------------------------------------------

_cluster_numbers = itertools.count(1)
_live_clusters: set[Cluster] = set()
_live_lock = threading.Lock()


def _next_cluster_number() -> int:
    return (next(_cluster_numbers) - 1) % 254 + 1  # the third octet of 10.77.<c>.<k>; 0 is the probe's


class Cluster:
    """A switch and ``n`` :class:`AgentNode` s (``nodes[0]`` is ``n1`` at ``10.77.<c>.1``), under ``root/n<k>``;
    with ``libvirt=True`` each node runs its own libvirtd and real compute, with ``public=True`` a public LAN joins
    the nodes' ``eth1`` (see the module docstring).

    Agents are not started unless ``start=True``; use :meth:`start_all`. Use as a context manager or call
    :meth:`close` (idempotent; also run at interpreter exit). ``extra_args``/``extra_env`` are copied into each node.
    """

    def __init__(
        self,
        root: Path,
        n: int = 3,
        *,
        start: bool = False,
        extra_args: Sequence[str] = (),
        extra_env: dict[str, str] | None = None,
        node_class: type[AgentNode] = AgentNode,
        libvirt: bool = False,
        public: bool = False,
    ) -> None:
        if not 1 <= n <= 250:
            raise ValueError("a cluster has 1 to 250 nodes")
        cleanup_stale_once()
        self.root = Path(root)
        self.number = _next_cluster_number()
        self.id = f"{os.getpid()}x{self.number}"
        self.subnet = f"{SUBNET}.{self.number}"
        self.extra_args = list(extra_args)
        self.extra_env = dict(extra_env or {})
        self.node_class = node_class
        self.libvirt = libvirt
        self.nodes: list[AgentNode] = []
        self.closed = False
        self.switch: Switch | None = None
        self.public: PublicLan | None = None
        with _live_lock:
            _live_clusters.add(self)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.switch = Switch(f"mcs{self.id}")
            if public:
                self.public = PublicLan(f"mcp{self.id}")
            for _ in range(n):
                self.add_node()
            if start:
                self.start_all()
        except BaseException:
            self.close()
            raise

    def add_node(self, **kw: Any) -> AgentNode:
        """Create one more node (not started): the next free number ``k``, address ``10.77.<c>.<k>``."""
        assert self.switch is not None
        k = len(self.nodes) + 1
        while any(node.address == f"{self.subnet}.{k}" for node in self.nodes):
            k += 1
        kw.setdefault("extra_args", self.extra_args)
        kw.setdefault("extra_env", self.extra_env)
        kw.setdefault("libvirt", self.libvirt)
        kw.setdefault("public", self.public)
        node = self.node_class(
            self.switch,
            f"mcn{self.id}n{k}",
            f"{self.subnet}.{k}",
            self.root / f"n{k}",
            node_name=f"n{k}",
            port=f"v{k}",
            **kw,
        )
        self.nodes.append(node)
        return node

    def start_all(self, timeout: float = 60) -> Cluster:
        """Start every node that is not running (in parallel) and wait until all serve."""
        started = [node for node in self.nodes if not node.running]
        for node in started:
            node.spawn()
        deadline = time.monotonic() + timeout
        for node in started:
            node.wait_ready(max(0.1, deadline - time.monotonic()))
        return self

    def form(self, timeout: float = 60) -> Cluster:
        """Make one cluster of the started agents: `cluster enable` on n1, `cluster add` + `join` for the others;
        return once every node is an online voter."""
        first, *others = self.nodes
        first.cli("cluster", "enable", check=True)
        for node in others:
            token = first.json("cluster", "add", node.node_name)["token"]
            node.cli("join", token, check=True)

        def formed() -> bool:
            members = first.client(timeout=30).call("GET", "/v1/cluster")["members"]
            return len(members) == len(self.nodes) and all(
                m["status"] == "online" and m["role"] == "voter" for m in members
            )

        wait_for(formed, timeout=timeout, interval=0.5, what="every node online as a voter")
        return self

    def stop_all(self) -> None:
        for node in self.nodes:
            if node.running:
                node.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for node in self.nodes:
            node.stop()

    @property
    def netns_names(self) -> list[str]:
        own = [sw.netns for sw in (self.switch, self.public) if sw is not None]
        return own + [node.netns for node in self.nodes]

    def close(self) -> None:
        """Kill every agent and process in our namespaces, delete the veth pairs and namespaces. Raises after trying
        everything if something could not be removed."""
        if self.closed:
            return
        self.closed = True
        errors: list[str] = []
        for node in self.nodes:
            try:
                node.close()
            except Exception as exc:
                errors.append(f"{node.netns}: {exc}")
        for switch in (self.public, self.switch):
            if switch is None:
                continue
            try:
                switch.close()
            except Exception as exc:
                errors.append(f"{switch.netns}: {exc}")
        with _live_lock:
            _live_clusters.discard(self)
        if errors:
            raise HarnessError("cluster cleanup failed: " + "; ".join(errors))

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[AgentNode]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, index: int) -> AgentNode:
        return self.nodes[index]

    def __repr__(self) -> str:
        return f"<Cluster {self.id} {self.subnet}.0/24 nodes={len(self.nodes)}>"


@atexit.register
def _close_live_clusters() -> None:
    with _live_lock:
        clusters = list(_live_clusters)
    for cluster in clusters:
        with contextlib.suppress(Exception):
            cluster.close()
