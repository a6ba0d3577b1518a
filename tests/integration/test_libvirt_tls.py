"""libvirtd's TLS listener as install.sh sets it up (``scripts/libvirt-tls`` + ``scripts/start-libvirtd``), against a
libvirtd of its own: the scripts run inside fresh PID, mount and network namespaces where temporary directories are
bind-mounted over ``/run``, ``/etc/libvirt``, ``/var/lib/libvirt``, ``/var/cache/libvirt`` and ``/var/log/libvirt``,
so this machine's libvirtd, its configuration and port 16514 are never touched (start-libvirtd looks for a running
libvirtd in ``/proc``: the PID namespace shows it only its own).

Started without the block: no listener. With it: libvirtd restarted with ``--listen``, and a client with a
certificate of the cluster CA gets an answer (``virsh -c qemu+tls://…``) while one without a certificate, or with one
of another CA, is refused. Re-run: nothing restarts; a new node certificate (``join``): restarted to load it. Block
removed: restarted without the listener.
And ``install.sh --uninstall`` removes the block (against a temporary ``MINICLOUD_LIBVIRT_CONF_DIR``)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.compute.migrate import write_tls_files
from minicloud.pki import ensure_node_pki
from tests.integration.conftest import REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, libvirtd)"),
]
START = REPO / "scripts" / "start-libvirtd"
TLS = REPO / "scripts" / "libvirt-tls"
MOUNTS = {
    "run": "/run",
    "etc": "/etc/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
}

#: A TLS client without a certificate (or with ``CERT KEY``): prints "answered" when libvirtd kept the connection
#: open and answered nothing within a second (its RPC waits for the client), "refused: …" when it closed it or the
#: handshake failed.
CLIENT = r"""
import socket, ssl, sys
ctx = ssl.create_default_context(cafile=sys.argv[1])
ctx.check_hostname = False
if len(sys.argv) > 3:
    ctx.load_cert_chain(sys.argv[2], sys.argv[3])
try:
    with socket.create_connection(("127.0.0.1", 16514), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        tls.settimeout(1)
        try:
            data = tls.recv(1)
            print("refused: closed" if data == b"" else "answered")
        except TimeoutError:
            print("answered")
except (ssl.SSLError, OSError) as exc:
    print(f"refused: {exc}")
"""


class Sandbox:
    """A PID + mount + network namespace (a bash loop as its init, which reaps what libvirtd leaves)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for name in MOUNTS:
            (root / name).mkdir(parents=True)
        # A probed QEMU capabilities cache spares the first start its probe (libvirtd checks that it is current).
        with contextlib.suppress(OSError):
            shutil.copytree("/var/cache/libvirt/qemu", root / "cache" / "qemu")
        ready = root / "ready"
        binds = " ".join(f"mount --bind {root / k} {v};" for k, v in MOUNTS.items())
        script = f"set -e; ip link set lo up; {binds} touch {ready}; set +e; while :; do sleep 1; done"
        self.holder = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--mount", "--net", "--propagation", "private",
             "bash", "-c", script],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert self.holder.poll() is None, "the namespace holder exited"
            assert time.monotonic() < deadline, "the namespace holder did not get ready"
            time.sleep(0.05)
        children = Path(f"/proc/{self.holder.pid}/task/{self.holder.pid}/children").read_text().split()
        self.init = int(children[0])

    def run(self, *cmd: object, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["nsenter", "-t", str(self.init), "--pid", "--mount", "--net", *map(str, cmd)],
            capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
        )  # fmt: skip

    def start_libvirtd(self, **env: str) -> str:
        result = self.run(START, env=env)
        assert result.returncode == 0, result.stdout + result.stderr + self.log()
        return result.stderr

    def listening(self) -> bool:
        tcp = self.run("cat", "/proc/net/tcp", "/proc/net/tcp6").stdout
        return any(f":{16514:04X}" == line.split()[1][-5:] and line.split()[3] == "0A" for line in tcp.splitlines()[1:]
                   if len(line.split()) > 3)  # fmt: skip

    def libvirtd_cmdline(self) -> str:
        pid = self.run("cat", "/run/libvirtd.pid").stdout.strip()
        return self.run("cat", f"/proc/{pid}/cmdline").stdout.replace("\0", " ")

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "log" / "libvirtd.log").read_text(errors="replace")[-2000:]
        return ""

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.init, 9)  # the namespace's init: everything in it goes with it
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.holder.wait(10)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    for tool in ("unshare", "nsenter", "libvirtd", "virsh", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (util-linux, libvirt-daemon, libvirt-clients, iproute2)")
    box = Sandbox(tmp_path / "ns")
    try:
        yield box
    finally:
        box.close()


def node_tls(data_dir: Path, name: str) -> Path:
    """A node's certificate (its own CA, as a node has before it joins) laid out as the agent lays it out."""
    ensure_node_pki(data_dir, name)
    return write_tls_files(data_dir)


def test_start_libvirtd_listens_on_tls_with_the_cluster_ca_only_while_the_block_is_there(
    sandbox: Sandbox, tmp_path: Path
):
    data = tmp_path / "data"
    tls = node_tls(data, "n1")
    other = node_tls(tmp_path / "other", "intruder")  # a certificate of another CA
    said = sandbox.start_libvirtd()
    assert "libvirtd started" in said and not sandbox.listening()  # no block: no listener

    enabled = sandbox.run(TLS, "enable", data)
    assert (enabled.returncode, enabled.stdout) == (0, "changed\n"), enabled.stderr
    said = sandbox.start_libvirtd(LIBVIRTD_RESTART="1")
    assert "TLS on port 16514" in said and sandbox.listening(), said
    assert " --listen" in sandbox.libvirtd_cmdline()
    assert (sandbox.root / "etc" / "libvirtd.conf").read_text().count("# BEGIN minicloud") == 1

    ok = sandbox.run("virsh", "-c", f"qemu+tls://127.0.0.1/system?pkipath={tls}", "version", timeout=60)
    assert ok.returncode == 0 and "QEMU" in ok.stdout, ok.stderr + sandbox.log()
    bare = sandbox.run(sys.executable, "-c", CLIENT, tls / "cacert.pem", timeout=60).stdout
    assert bare.startswith("refused"), bare
    stranger = sandbox.run(
        sys.executable, "-c", CLIENT, tls / "cacert.pem", other / "clientcert.pem", other / "clientkey.pem", timeout=60
    ).stdout
    assert stranger.startswith("refused"), stranger
    member = sandbox.run(
        sys.executable, "-c", CLIENT, tls / "cacert.pem", tls / "clientcert.pem", tls / "clientkey.pem", timeout=60
    ).stdout
    assert member == "answered\n", member
    foreign = sandbox.run("virsh", "-c", f"qemu+tls://127.0.0.1/system?pkipath={other}", "version", timeout=60)
    assert foreign.returncode != 0

    # a re-run changes nothing: the same libvirtd keeps running
    pid = sandbox.run("cat", "/run/libvirtd.pid").stdout
    assert sandbox.run(TLS, "enable", data).stdout == "unchanged\n"
    said = sandbox.start_libvirtd()
    assert "already running" in said and sandbox.run("cat", "/run/libvirtd.pid").stdout == pid, said

    # a new node certificate (as `minicloud join` brings): libvirtd reads it only at start, so it is restarted
    for name in ("ca.crt", "ca.key", "server.crt", "server.key"):
        (data / "pki" / name).unlink()
    node_tls(data, "n1")
    stale = sandbox.run("virsh", "-c", f"qemu+tls://127.0.0.1/system?pkipath={tls}", "version", timeout=60)
    assert stale.returncode != 0  # the running libvirtd still holds the old CA
    said = sandbox.start_libvirtd()
    assert "to load the node's new TLS certificate" in said, said
    ok = sandbox.run("virsh", "-c", f"qemu+tls://127.0.0.1/system?pkipath={tls}", "version", timeout=60)
    assert ok.returncode == 0, ok.stderr + sandbox.log()

    # the block removed (uninstall): restarted without a listener
    assert sandbox.run(TLS, "disable").stdout == "changed\n"
    said = sandbox.start_libvirtd()
    assert "without its TLS listener" in said and not sandbox.listening(), said
    assert "# BEGIN minicloud" not in (sandbox.root / "etc" / "libvirtd.conf").read_text()


def test_uninstall_removes_the_block(tmp_path: Path):
    """What install.sh wrote into libvirt's files goes with ``install.sh --uninstall`` (nothing else is installed
    here; the agent's data directory and bridge are temporary ones)."""
    conf = tmp_path / "libvirt-etc"
    conf.mkdir()
    (conf / "libvirtd.conf").write_text("listen_tls = 0\n")
    data = tmp_path / "data"
    node_tls(data, "n-un")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINICLOUD_")}
    assert subprocess.run([TLS, "enable", data], env={**env, "LIBVIRT_CONF_DIR": str(conf)}).returncode == 0
    config = tmp_path / "minicloud.toml"
    config.write_text(
        f'[agent]\ndata_dir = "{data}"\nsocket = "{tmp_path / "run" / "s.sock"}"\nnode_name = "n-un"\n'
        f'[network]\nbridge = "mcu{secrets.token_hex(3)}"\n'
    )
    env.update(
        MINICLOUD_PREFIX=str(tmp_path / "opt"),
        MINICLOUD_CONFIG=str(config),
        MINICLOUD_UNIT_FILE=str(tmp_path / "minicloud.service"),
        MINICLOUD_BIN_LINK=str(tmp_path / "bin" / "minicloud"),
        MINICLOUD_COMPLETION_FILE=str(tmp_path / "completion"),
        MINICLOUD_LOG_DIR=str(tmp_path / "log"),
        MINICLOUD_LIBVIRT_CONF_DIR=str(conf),
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
    )
    result = subprocess.run(
        [REPO / "scripts" / "install.sh", "--uninstall"], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "removed minicloud's blocks" in result.stdout
    assert (conf / "libvirtd.conf").read_text() == "listen_tls = 0\n"
    assert not (conf / "qemu.conf").read_text()
