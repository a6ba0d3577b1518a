"""What the node's network drivers share: one error hierarchy, netlink lookups, daemon processes, network namespaces.

Used by :mod:`agent.net.default` (the single bridge network), :mod:`agent.net.overlay` (VXLAN networks),
:mod:`agent.net.dhcp` (per-network dnsmasq) and :mod:`agent.net.firewall` (nftables). Nothing here keeps state.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import time
from pathlib import Path
from typing import Any

from pyroute2 import AsyncIPRoute, NetlinkError
from pyroute2 import config as pyroute2_config

# pyroute2 opens a socket inside another network namespace from a forked child, then SIGTERMs the child. The child
# inherits the agent's asyncio signal wake-up fd, so unless it resets SIGTERM to the default first, that SIGTERM
# reaches the agent's event loop as if the agent itself had been told to stop (seen: agents stopping right after
# building a service namespace). This makes the child reset SIGINT/SIGTERM before it does anything.
pyroute2_config.disable_mp_signal = True

#: How long a forking daemon (dnsmasq) may take to start, or to exit after SIGTERM.
DAEMON_TIMEOUT = 10.0
NSENTER_BINARY = "nsenter"


# --- errors ------------------------------------------------------------------------------------------------------------


class NetworkError(Exception):
    """A network could not be converged or torn down; the message says which step failed and why."""


class NetworkConflict(NetworkError):
    """Something else on the host already uses the bridge's name or the network's address range."""


class NetworkPermissionError(NetworkError):
    """The agent lacks the privileges (CAP_NET_ADMIN, root for nftables and dnsmasq) to manage guest networks."""


def netlink_error(action: str, err: NetlinkError) -> NetworkError:
    """The driver-edge translation of a pyroute2 ``NetlinkError`` into our hierarchy."""
    if err.code in (errno.EPERM, errno.EACCES):
        return NetworkPermissionError(f"{action}: permission denied; the agent needs CAP_NET_ADMIN (run it as root)")
    return NetworkError(f"{action}: {os.strerror(err.code)} (netlink error {err.code})")


# --- netlink -----------------------------------------------------------------------------------------------------------


async def get_link(ipr: AsyncIPRoute, name: str) -> Any | None:
    """The link message of interface ``name``, or None when there is none."""
    try:
        result = await ipr.link("get", ifname=name)
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise
    msgs = [m async for m in result] if hasattr(result, "__aiter__") else list(result)
    return msgs[0] if msgs else None


async def collect(result: Any) -> list[Any]:
    """The messages of a pyroute2 dump call (``ipr.link("dump")``), whichever way this pyroute2 returns them."""
    result = await result
    return [m async for m in result] if hasattr(result, "__aiter__") else list(result)


@contextlib.asynccontextmanager
async def ns_socket(path: str) -> Any:
    """A netlink socket inside the network namespace at ``path`` (which must exist), closed on leaving."""
    try:
        ipr = AsyncIPRoute(netns=path, flags=0)
        await ipr.setup_endpoint()
    except (OSError, NetlinkError) as e:
        raise NetworkError(f"cannot open a netlink socket in network namespace {path}: {e}") from e
    try:
        yield ipr
    finally:
        ipr.close()


# --- network namespaces ------------------------------------------------------------------------------------------------


def netns_path(netns: str) -> str:
    """The file of a network namespace given by name (``ip netns add NAME``) or by path."""
    return netns if "/" in netns else f"/run/netns/{netns}"


def netns_argv(netns: str | None) -> list[str]:
    """The prefix that runs a command inside ``netns`` (nothing for the agent's own namespace).

    ``nsenter --net`` enters the network namespace only; unlike ``ip netns exec`` it leaves the mount namespace and
    ``/sys`` alone (see ENVIRONMENT.md: test nodes have private mounts).
    """
    if netns is None:
        return []
    return [NSENTER_BINARY, f"--net={netns_path(netns)}", "--"]


# --- processes ---------------------------------------------------------------------------------------------------------


def cmdline(pid: int) -> list[str] | None:
    """argv of a live process; None when it is gone, a zombie (nobody reaped it yet) or a kernel thread."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw:
        return None
    return [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")]


def read_int(path: Path) -> int | None:
    """A positive integer from a pid-style file; None when missing, unreadable or not a positive integer."""
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def same_command(have: list[str], want: list[str]) -> bool:
    """Same arguments and the same program name (the program's directory may differ, e.g. after $PATH changes)."""
    return os.path.basename(have[0]) == os.path.basename(want[0]) and have[1:] == want[1:]


def processes_with_arg(arg: str) -> dict[int, list[str]]:
    """Every live process with ``arg`` among its arguments (not its program name): pid -> argv. Blocking (reads /proc)."""
    found: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            cmd = cmdline(int(entry))
            if cmd is not None and arg in cmd[1:]:
                found[int(entry)] = cmd
    return found


async def stop_process(pid: int) -> None:
    """SIGTERM, then SIGKILL after :data:`DAEMON_TIMEOUT`; returns once the process is gone (or a zombie)."""
    for sig, wait in ((signal.SIGTERM, DAEMON_TIMEOUT), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError as e:
            raise NetworkPermissionError(f"cannot signal process {pid}: permission denied") from e
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if cmdline(pid) is None:
                return
            await asyncio.sleep(0.02)
    raise NetworkError(f"process {pid} did not exit after SIGKILL")


async def run_daemonizing(argv: list[str], what: str, install_hint: str) -> None:
    """Run a command that forks a daemon and exits once it is ready (dnsmasq), and wait for that first exit.

    The daemon is started in a new session, so a signal to the agent's process group spares it. Raises
    :class:`NetworkError` when the program is missing (``install_hint`` says which package has it), when the first
    process does not exit within :data:`DAEMON_TIMEOUT` (it is killed) or exits non-zero (its stderr is quoted).
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except FileNotFoundError as e:
        raise NetworkError(f"{argv[0]} not found; {install_hint}") from e
    try:
        _, err = await asyncio.wait_for(proc.communicate(), DAEMON_TIMEOUT)
    except TimeoutError as e:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise NetworkError(f"{what} did not start within {DAEMON_TIMEOUT} s") from e
    if proc.returncode != 0:
        msg = err.decode(errors="replace").strip()
        raise NetworkError(f"{what} failed to start (exit {proc.returncode}): {msg}")


def write_if_changed(path: Path, text: str) -> bool:
    """Replace ``path`` with ``text`` (mode 0644, atomically: a reader sees the old or the new file) unless it holds
    that already; True when it was written (the daemon reading it must be told)."""
    try:
        if path.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.replace(tmp, path)
    return True
