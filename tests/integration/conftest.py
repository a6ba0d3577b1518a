"""Real agents as subprocesses, each with its own data directory, socket and HTTPS port, driven through the CLI."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minicloud.client import Client

REPO = Path(__file__).resolve().parents[2]


def compute_config(root: Path) -> str:
    """A config with real compute: libvirt (TCG), and a default network whose bridge and subnet are this agent's
    own (tests run agents in parallel on one host), images importable from ``root``."""
    tag = secrets.token_hex(3)
    subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}.0/24"
    return (
        f'[agent]\nnode_name = "node-{tag}"\n'
        f'[compute]\ndriver = "libvirt"\nvirt_type = "qemu"\nimage_dirs = ["{root}"]\nstop_timeout = 5.0\n'
        f'[network]\nbridge = "mct{tag}"\ncidr = "{subnet}"\n'
    )


def wait_until(what: str, check, timeout: float, interval: float = 0.5):
    """Poll ``check()`` until it returns something truthy (returned), or fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Agent:
    """One `minicloud agent` process. ``cli(...)`` runs the shell client against it, as a user would."""

    def __init__(
        self,
        root: Path,
        *,
        listen: str = "127.0.0.1:0",
        extra_env: dict[str, str] | None = None,
        compute: bool = False,
    ) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.socket = root / "run" / "minicloud.sock"
        self.listen = listen
        self.log = root / "agent.log"
        self.config = root / "minicloud.toml"
        root.mkdir(parents=True, exist_ok=True)
        if not self.config.exists():
            # No compute unless a test asks for it (`compute=True`): no bridge, no libvirt for the API-only tests.
            self.config.write_text(compute_config(root) if compute else '[compute]\ndriver = "none"\n')
        self.env = {
            **os.environ,
            "MINICLOUD_CONFIG": str(self.config),
            "XDG_CONFIG_HOME": str(root / "client-config"),
            "PYTHONUNBUFFERED": "1",
            **(extra_env or {}),
        }
        self.env.pop("MINICLOUD_SOCKET", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, object] = {}

    def start(self, timeout: float = 30) -> Agent:
        state = self.data_dir / "agent.json"
        state.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "minicloud", "agent", "--data-dir", str(self.data_dir), "--listen", self.listen]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*cmd[:3], "--socket", str(self.socket), *cmd[3:]],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                info = json.loads(state.read_text())
                if info["pid"] == self.proc.pid:
                    self.info = info
                    return self
            except (FileNotFoundError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"agent did not become ready:\n{self.log.read_text()[-3000:]}")

    @property
    def https(self) -> str:
        return f"https://{self.info['https']}"

    def client(self) -> Client:
        return Client.local(str(self.socket))

    def https_client(self, token: str | None) -> Client:
        return Client(url=self.https, token=token, ca_pem=(self.data_dir / "pki" / "ca.crt").read_text())

    def cli(
        self, *args: str, input: str | None = None, check: bool = False, socket: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "minicloud"] + (["--socket", str(self.socket)] if socket else []) + list(args)
        result = subprocess.run(
            cmd, capture_output=True, text=True, errors="replace", input=input, env=self.env, timeout=120, cwd=REPO
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def json(self, *args: str) -> object:
        return json.loads(self.cli("-o", "json", *args, check=True).stdout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def teardown_compute(self) -> None:
        """Remove what a compute agent leaves on the host on purpose (guests and their network outlive an agent
        restart): its domains, and its bridge, dnsmasq and nftables table."""
        import asyncio
        import tomllib

        import libvirt

        from agent.net.default import BridgeNetwork, NetworkSpec

        conn = libvirt.open("qemu:///system")
        try:
            for dom in conn.listAllDomains(0):
                if str(self.data_dir) in dom.XMLDesc(0):
                    if dom.isActive():
                        dom.destroy()
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        finally:
            conn.close()
        net = tomllib.loads(self.config.read_text())["network"]
        spec = NetworkSpec(name="default", bridge=net["bridge"], cidr=net["cidr"])
        asyncio.run(BridgeNetwork(spec, self.data_dir / "networks" / "default").teardown())


@pytest.fixture(scope="session")
def agent(tmp_path_factory) -> Agent:
    """One agent shared by the tests of a worker that only add uniquely named resources."""
    a = Agent(tmp_path_factory.mktemp("agent")).start()
    yield a
    a.stop()


@pytest.fixture
def fresh_agent(tmp_path) -> Agent:
    a = Agent(tmp_path / "node").start()
    yield a
    if a.proc and a.proc.poll() is None:
        a.kill()


GUEST_SCRIPT = REPO / "scripts" / "build-guest-image"


@pytest.fixture(scope="session")
def guest_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    if not Path("/bin/busybox").exists():
        pytest.skip("/bin/busybox is missing (Debian package busybox-static)")
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("apt-get/dpkg-deb are missing: the guest kernel comes from a Debian package")
    out = tmp_path_factory.mktemp("guest-image")
    proc = subprocess.run([str(GUEST_SCRIPT), str(out)], capture_output=True, text=True, timeout=300)
    if proc.returncode == 3:
        pytest.skip(f"no guest kernel package could be downloaded or found in the cache: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"build-guest-image failed:\n{proc.stdout}\n{proc.stderr}"
    assert (out / "vmlinuz").stat().st_size > 1_000_000
    assert (out / "initrd.img").stat().st_size > 100_000
    return out
