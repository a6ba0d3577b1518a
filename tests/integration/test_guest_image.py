"""scripts/build-guest-image: the kernel + initramfs test guest boots under TCG, takes a DHCP lease, reads a NoCloud
seed (hostname, user-data script) and serves HTTP.

QEMU runs with user-mode networking (slirp): the guest only talks DHCP to QEMU's built-in server, and the HTTP check
reaches it through a hostfwd on 127.0.0.1. Nothing leaves the machine.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from agent.compute.seed import meta_data, network_config_dhcp, write_nocloud_seed
from tests.integration.conftest import GUEST_SCRIPT

REPO = Path(__file__).resolve().parents[2]
QEMU = shutil.which("qemu-system-x86_64")
BOOT_TIMEOUT = 120

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Guest:
    def __init__(self, image: Path, workdir: Path, extra: list[str], nic: str = "user,model=virtio-net-pci") -> None:
        self.log = workdir / "serial.log"
        self.proc = subprocess.Popen(
            [
                QEMU,
                "-machine",
                "q35",
                "-accel",
                "tcg",
                "-m",
                "128",
                "-display",
                "none",
                "-monitor",
                "none",
                "-serial",
                f"file:{self.log}",
                "-kernel",
                str(image / "vmlinuz"),
                "-initrd",
                str(image / "initrd.img"),
                "-append",
                "console=ttyS0 panic=-1",
                "-no-reboot",
                "-nic",
                nic,
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_for(self, marker: str, timeout: float = BOOT_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.text()
            if marker in out.splitlines():
                return out
            if self.proc.poll() is not None:
                break
            time.sleep(0.25)
        err = self.proc.stderr.read().decode() if self.proc.poll() is not None and self.proc.stderr else ""
        pytest.fail(f"no {marker!r} on the serial console; qemu: {err}\n--- serial log ---\n{self.text()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stderr:
            self.proc.stderr.close()


def test_guest_boots_and_takes_a_dhcp_lease(guest_image: Path, tmp_path: Path) -> None:
    guest = Guest(guest_image, tmp_path, [])
    try:
        out = guest.wait_for("minicloud-guest: ready")
        lines = out.splitlines()
        assert "minicloud-guest: ip=10.0.2.15" in lines
        assert "minicloud-guest: hostname=minicloud-guest" in lines
        assert not any("insmod" in line and "failed" in line for line in lines), out
    finally:
        guest.stop()


@pytest.mark.parametrize("attach", ["virtio-disk", "cdrom"])
def test_guest_reads_nocloud_seed_and_serves_http(guest_image: Path, tmp_path: Path, attach: str) -> None:
    seed = tmp_path / "seed.iso"
    write_nocloud_seed(
        seed,
        meta_data=meta_data("i-test", "seeded-guest"),
        user_data=b"#!/bin/sh\necho 'minicloud-guest: user-data ran'\necho from-user-data > /www/ud.txt\n",
        network_config=network_config_dhcp(),
    )
    drive = (
        ["-drive", f"file={seed},if=virtio,format=raw,readonly=on"]
        if attach == "virtio-disk"
        else [
            "-drive",
            f"file={seed},if=none,id=seed,format=raw,media=cdrom,readonly=on",
            "-device",
            "ide-cd,drive=seed,bus=ide.0",
        ]
    )
    port = free_port()
    guest = Guest(guest_image, tmp_path, drive, nic=f"user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{port}-:80")
    try:
        out = guest.wait_for("minicloud-guest: ready")
        lines = out.splitlines()
        assert "minicloud-guest: hostname=seeded-guest" in lines, out
        assert "minicloud-guest: user-data ran" in lines, out
        assert "minicloud-guest: user-data ran rc=0" in lines, out
        assert "minicloud-guest: ip=10.0.2.15" in lines, out
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
            assert "seeded-guest" in resp.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ud.txt", timeout=10) as resp:
            assert resp.read().decode().strip() == "from-user-data"
    finally:
        guest.stop()


def test_build_is_idempotent(guest_image: Path) -> None:
    """A rerun into the same directory succeeds from the cache and leaves the same two files."""
    proc = subprocess.run([str(GUEST_SCRIPT), str(guest_image)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "downloading" not in proc.stdout
    assert sorted(p.name for p in guest_image.iterdir()) == ["initrd.img", "vmlinuz"]
