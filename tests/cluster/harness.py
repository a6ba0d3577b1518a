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
NETNS_RE = re.compile(r"^mc[sn](?P<pid>\d+)x\d+(n\d+)?$")
SUBNET = "10.77"
AGENT_PORT = 8443
BRIDGE = "br0"

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

    def _cmd(self, cmd: Sequence[object]) -> list[str]:
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
        root.mkdir(parents=True, exist_ok=True)
        if not self.config.exists():
            self.config.write_text('# no compute in the cluster tests\n[compute]\ndriver = "none"\n')
        super().__init__(switch, netns, address, **kw)

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
        """The whole node dies at once: SIGKILL every process in its namespace (the agent and the etcd it runs)."""
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
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        super().close()


# -- clusters ----------------------------------------------------------------------------------------------------------

_cluster_numbers = itertools.count(1)
_live_clusters: set[Cluster] = set()
_live_lock = threading.Lock()


def _next_cluster_number() -> int:
    return (next(_cluster_numbers) - 1) % 254 + 1  # the third octet of 10.77.<c>.<k>; 0 is the probe's


class Cluster:
    """A switch and ``n`` :class:`AgentNode` s (``nodes[0]`` is ``n1`` at ``10.77.<c>.1``), under ``root/n<k>``.

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
        self.nodes: list[AgentNode] = []
        self.closed = False
        self.switch: Switch | None = None
        with _live_lock:
            _live_clusters.add(self)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.switch = Switch(f"mcs{self.id}")
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

    def stop_all(self) -> None:
        for node in self.nodes:
            if node.running:
                node.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for node in self.nodes:
            node.stop()

    @property
    def netns_names(self) -> list[str]:
        return ([self.switch.netns] if self.switch else []) + [node.netns for node in self.nodes]

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
        if self.switch is not None:
            try:
                self.switch.close()
            except Exception as exc:
                errors.append(f"{self.switch.netns}: {exc}")
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
