"""scripts/build-guest-image: the kernel + initramfs test guest boots under TCG, takes a DHCP lease, reads a NoCloud
seed (hostname, user-data script) and serves HTTP.

QEMU runs with user-mode networking (slirp): the guest only talks DHCP to QEMU's built-in server, and the HTTP check
reaches it through a hostfwd on 127.0.0.1. Nothing leaves the machine.
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "build-guest-image"
QEMU = shutil.which("qemu-system-x86_64")
BOOT_TIMEOUT = 120

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def guest_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    if not Path("/bin/busybox").exists():
        pytest.skip("/bin/busybox is missing (Debian package busybox-static)")
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("apt-get/dpkg-deb are missing: the guest kernel comes from a Debian package")
    out = tmp_path_factory.mktemp("guest-image")
    proc = subprocess.run([str(SCRIPT), str(out)], capture_output=True, text=True, timeout=300)
    if proc.returncode == 3:
        pytest.skip(f"no guest kernel package could be downloaded or found in the cache: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"build-guest-image failed:\n{proc.stdout}\n{proc.stderr}"
    assert (out / "vmlinuz").stat().st_size > 1_000_000
    assert (out / "initrd.img").stat().st_size > 100_000
    return out


def iso9660(volume_id: str, files: dict[str, bytes]) -> bytes:
    """A minimal ISO 9660 image (one root directory, level-1 names, no extensions), enough for Linux's isofs."""
    sector = 2048

    def both16(n: int) -> bytes:
        return struct.pack("<H", n) + struct.pack(">H", n)

    def both32(n: int) -> bytes:
        return struct.pack("<I", n) + struct.pack(">I", n)

    date7 = bytes([124, 1, 1, 0, 0, 0, 0])  # 2024-01-01 00:00:00 UTC

    def record(name: bytes, lba: int, size: int, is_dir: bool) -> bytes:
        body = (
            bytes([0])
            + both32(lba)
            + both32(size)
            + date7
            + bytes([2 if is_dir else 0, 0, 0])
            + both16(1)
            + bytes([len(name)])
            + name
        )
        rec = bytes([len(body) + 1]) + body
        return rec + (b"\0" if len(rec) % 2 else b"")

    root_lba, first_file_lba = 20, 21
    entries, data, lba = [], b"", first_file_lba
    for name, content in sorted(files.items()):
        entries.append(record(f"{name.upper()};1".encode(), lba, len(content), False))
        padded = content + b"\0" * (-len(content) % sector)
        data += padded
        lba += max(1, len(padded) // sector)
        if not content:
            data += b"\0" * sector
    root = record(b"\0", root_lba, sector, True) + record(b"\1", root_lba, sector, True) + b"".join(entries)
    assert len(root) <= sector
    total = lba

    def text(s: str, n: int) -> bytes:
        return s.encode().ljust(n, b" ")

    date17 = b"0" * 16 + b"\0"
    pvd = (
        b"\x01CD001\x01\x00"
        + text("", 32)
        + text(volume_id, 32)
        + b"\0" * 8
        + both32(total)
        + b"\0" * 32
        + both16(1)
        + both16(1)
        + both16(sector)
        + both32(10)
        + struct.pack("<I", 18)
        + b"\0" * 4
        + struct.pack(">I", 19)
        + b"\0" * 4
        + record(b"\0", root_lba, sector, True)
        + text("", 128) * 4
        + text("", 37) * 3
        + date17 * 4
        + b"\x01\x00"
    )
    pvd = pvd.ljust(sector, b"\0")
    terminator = b"\xffCD001\x01".ljust(sector, b"\0")
    path_l = (bytes([1, 0]) + struct.pack("<I", root_lba) + struct.pack("<H", 1) + b"\0\0").ljust(sector, b"\0")
    path_m = (bytes([1, 0]) + struct.pack(">I", root_lba) + struct.pack(">H", 1) + b"\0\0").ljust(sector, b"\0")
    image = b"\0" * (16 * sector) + pvd + terminator + path_l + path_m + root.ljust(sector, b"\0") + data
    assert len(image) == total * sector
    return image


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
    seed.write_bytes(
        iso9660(
            "cidata",
            {
                "meta-data": b"instance-id: i-test\nlocal-hostname: seeded-guest\n",
                "user-data": b"#!/bin/sh\necho 'minicloud-guest: user-data ran'\necho from-user-data > /www/ud.txt\n",
            },
        )
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
    proc = subprocess.run([str(SCRIPT), str(guest_image)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "downloading" not in proc.stdout
    assert sorted(p.name for p in guest_image.iterdir()) == ["initrd.img", "vmlinuz"]
