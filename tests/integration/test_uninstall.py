"""``scripts/install.sh --uninstall [--purge]`` leaves the host as it found it (root, real libvirt, netlink, nftables).

A full install.sh run (apt-get, a fresh virtualenv with every dependency built) takes minutes and writes to /opt and
/etc of the test machine, so the test reproduces what install.sh leaves on a node without systemd, under temporary
paths: an "installed" minicloud in ``$MINICLOUD_PREFIX/venv`` (a wrapper around this checkout's), the
``/usr/local/bin/minicloud`` link, a unit file, the bash completion file, a config, and the agent started in the
background exactly as install.sh starts it (setsid, pid file next to the socket). Every path is passed to the
uninstall through the environment variables the script documents.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import libvirt
import pytest

from tests.integration.conftest import REPO, compute_config, wait_until

pytestmark = pytest.mark.slow
INSTALL = REPO / "scripts" / "install.sh"


class Installed:
    """What install.sh leaves on a node (under ``root``), and the environment that points the uninstall at it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.prefix = root / "opt"
        self.venv = self.prefix / "venv"
        self.config = root / "etc" / "minicloud.toml"
        self.data_dir = root / "data"
        self.run_dir = root / "run"
        self.socket = self.run_dir / "minicloud.sock"
        self.unit = root / "systemd" / "minicloud.service"
        self.link = root / "bin" / "minicloud"
        self.completion = root / "completion" / "minicloud"
        self.log_dir = root / "log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("MINICLOUD_")},
            "MINICLOUD_PREFIX": str(self.prefix),
            "MINICLOUD_CONFIG": str(self.config),
            "MINICLOUD_UNIT_FILE": str(self.unit),
            "MINICLOUD_BIN_LINK": str(self.link),
            "MINICLOUD_COMPLETION_FILE": str(self.completion),
            "MINICLOUD_LOG_DIR": str(self.log_dir),
            "XDG_CONFIG_HOME": str(root / "client-config"),
        }
        self.pid: int | None = None

    def install(self, images: Path) -> None:
        (self.venv / "bin").mkdir(parents=True)
        wrapper = self.venv / "bin" / "minicloud"
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m minicloud "$@"\n')
        wrapper.chmod(0o755)
        (self.prefix / ".installed-fingerprint").write_text("x\n")
        for path in (self.link, self.unit, self.completion, self.config):
            path.parent.mkdir(parents=True, exist_ok=True)
        self.link.symlink_to(wrapper)
        shutil.copy(REPO / "systemd" / "minicloud.service", self.unit)
        self.completion.write_text(self.cli("completion", "bash", socket=False).stdout)
        compute = compute_config(images).split("\n", 2)[2]  # without its [agent] section
        agent = (
            f'[agent]\ndata_dir = "{self.data_dir}"\nsocket = "{self.socket}"\nlisten = "127.0.0.1:0"\n'
            f'node_name = "un-{secrets.token_hex(3)}"\n'
        )
        self.config.write_text(agent + compute)
        self.log_dir.mkdir()
        self.run_dir.mkdir()
        pidfile = self.run_dir / "agent.pid"
        with (self.log_dir / "agent.log").open("ab") as log:
            proc = subprocess.Popen(
                [str(wrapper), "agent", "--config", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO,
                start_new_session=True,
            )  # fmt: skip
        self.pid = proc.pid
        pidfile.write_text(f"{proc.pid}\n")

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError((self.log_dir / "agent.log").read_text()[-3000:])
            try:
                return json.loads((self.data_dir / "agent.json").read_text())["pid"] == proc.pid
            except (FileNotFoundError, ValueError, KeyError):
                return False

        wait_until("the agent", ready, timeout=60, interval=0.1)
        self.proc = proc

    def cli(self, *args: str, socket: bool = True, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "minicloud"] + (["--socket", str(self.socket)] if socket else []) + list(args)
        result = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=300, cwd=REPO)
        assert not check or result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
        return result

    def uninstall(self, *flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(INSTALL), "--uninstall", *flags], capture_output=True, text=True, env=self.env, timeout=300
        )

    @property
    def bridge(self) -> str:
        import tomllib

        return tomllib.loads(self.config.read_text())["network"]["bridge"]


def leftovers(inst: Installed, bridge: str) -> list[str]:
    """Everything of this installation still on the host."""
    found = []
    conn = libvirt.open("qemu:///system")
    try:
        found += [f"domain {d.name()}" for d in conn.listAllDomains(0) if str(inst.data_dir) in d.XMLDesc(0)]
    finally:
        conn.close()
    if subprocess.run(["ip", "link", "show", "dev", bridge], capture_output=True).returncode == 0:
        found.append(f"link {bridge}")
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    if f"minicloud-{bridge}" in tables:
        found.append(f"nft table minicloud-{bridge}")
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(inst.data_dir) in cmd or str(inst.config) in cmd:
            found.append(f"process {proc.name}: {cmd[:120]}")
    for path in (inst.unit, inst.link, inst.venv, inst.completion, inst.socket, inst.run_dir):
        if path.exists() or path.is_symlink():
            found.append(f"file {path}")
    return found


@pytest.fixture
def installed(tmp_path: Path, guest_image: Path):
    inst = Installed(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    for f in ("vmlinuz", "initrd.img"):
        shutil.copy(guest_image / f, images / f)
    inst.install(images)
    yield inst
    if inst.pid and Path(f"/proc/{inst.pid}").exists():  # the test failed before the uninstall: clean up anyway
        inst.uninstall("--purge", "--force")


def test_uninstall_removes_everything_minicloud_put_on_the_node_and_purge_the_data(installed: Installed):
    inst = installed
    images = inst.root / "images"
    inst.cli("image", "import", "guest", "--kernel", str(images / "vmlinuz"), "--initrd", str(images / "initrd.img"))
    created = json.loads(inst.cli("-o", "json", "instance", "create", "vm1", "--image", "guest", "--type", "m1.tiny",
                                  "--wait").stdout)  # fmt: skip
    assert created["status"]["state"] == "running"
    bridge = inst.bridge
    before = leftovers(inst, bridge)
    assert any(x.startswith("domain") for x in before) and f"link {bridge}" in before
    assert f"nft table minicloud-{bridge}" in before and any("dnsmasq" in x for x in before)

    result = inst.uninstall()
    assert result.returncode == 0, result.stdout + result.stderr
    left = leftovers(inst, bridge)
    assert left == [], "\n".join(left) + "\n" + result.stdout
    assert not Path(f"/proc/{inst.pid}").exists() or b"agent" not in Path(f"/proc/{inst.pid}/cmdline").read_bytes()
    # Kept without --purge: the state, the CA and the images; the configuration; the logs.
    assert (inst.data_dir / "state.db").exists() and (inst.data_dir / "pki" / "ca.crt").exists()
    assert inst.config.exists() and (inst.log_dir / "agent.log").exists()

    again = inst.uninstall("--purge")  # idempotent, and --purge deletes what was kept
    assert again.returncode == 0, again.stdout + again.stderr
    assert not inst.data_dir.exists() and not inst.config.exists() and not inst.log_dir.exists()


def test_a_node_whose_cluster_cannot_be_asked_is_refused_unless_forced(tmp_path: Path):
    inst = Installed(tmp_path)
    inst.data_dir.mkdir(parents=True)
    inst.config.parent.mkdir(parents=True)
    inst.config.write_text(
        f'[agent]\ndata_dir = "{inst.data_dir}"\nsocket = "{inst.socket}"\nnode_name = "n-gone"\n'
        f'[network]\nbridge = "mcu{secrets.token_hex(3)}"\n'
    )
    (inst.venv / "bin").mkdir(parents=True)
    wrapper = inst.venv / "bin" / "minicloud"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m minicloud "$@"\n')
    wrapper.chmod(0o755)
    (inst.data_dir / "cluster.json").write_text(json.dumps({"node": "n-gone", "endpoints": ["https://127.0.0.1:9"]}))
    refused = inst.uninstall()
    assert refused.returncode != 0
    assert "cluster remove n-gone" in refused.stderr and "--force" in refused.stderr
    assert inst.venv.exists()  # nothing was removed
    forced = inst.uninstall("--force")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert not inst.venv.exists() and (inst.data_dir / "cluster.json").exists()
