"""The busybox test guest as a bootable disk image (BIOS), for tests that need a *disk* image — one that can go into
a storage pool (a kernel image stays files on its node).

:func:`build` writes a raw disk: an MBR partition table with one FAT partition (1 to 33 MiB) holding the guest's
``vmlinuz``, ``initrd.img`` and ``/boot/grub/grub.cfg``; GRUB's ``core.img`` in the gap after the MBR and its
``boot.img`` in the MBR, linked by hand as ``grub-bios-setup`` does (the same steps as ``scripts/build-cloud-image``).
The rest of the disk (from 33 MiB) belongs to no partition: a guest may write test data there."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

GRUB_PC = Path("/usr/lib/grub/i386-pc")
PART_START = 2048  # sectors: 1 MiB
PART_MIB = 32
DISK_MIB = 64
#: Where a guest may write (bytes from the start of the disk): past the partition.
FREE_OFFSET = (1 + PART_MIB + 1) << 20


def unavailable_reason() -> str | None:
    for tool in ("grub-mkimage", "mkfs.vfat", "mcopy", "mmd", "sfdisk"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (Debian packages grub-common, dosfstools, mtools, fdisk)"
    if not (GRUB_PC / "boot.img").exists():
        return "GRUB's BIOS images are missing (Debian package grub-pc-bin)"
    return None


def _run(*cmd: str | Path) -> None:
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True, timeout=120)


def build(guest: Path, out: Path, cmdline: str = "console=ttyS0 panic=-1") -> Path:
    """The raw disk ``out`` booting ``guest``'s ``vmlinuz`` and ``initrd.img`` with ``cmdline``."""
    work = out.parent / f"{out.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    cfg = work / "grub.cfg"
    cfg.write_text(
        "set timeout=0\nset default=0\nserial --unit=0 --speed=115200\nterminal_output serial\n"
        f"menuentry guest {{\n  linux /vmlinuz {cmdline}\n  initrd /initrd.img\n}}\n"
    )
    core = work / "core.img"
    _run("grub-mkimage", "-O", "i386-pc", "-o", core, "-p", "(hd0,msdos1)/boot/grub",
         "biosdisk", "part_msdos", "fat", "normal", "configfile", "linux", "serial", "terminal", "echo", "test")  # fmt: skip
    core_sectors = (core.stat().st_size + 511) // 512
    assert core_sectors < PART_START - 1, core_sectors
    part = work / "part.img"
    part.unlink(missing_ok=True)
    with part.open("wb") as f:
        f.truncate(PART_MIB << 20)
    _run("mkfs.vfat", "-n", "GUESTBOOT", part)
    _run("mmd", "-i", part, "::/boot", "::/boot/grub")
    _run("mcopy", "-i", part, cfg, "::/boot/grub/grub.cfg")
    for name in ("vmlinuz", "initrd.img"):
        _run("mcopy", "-i", part, guest / name, f"::/{name}")
    out.unlink(missing_ok=True)
    with out.open("wb") as f:
        f.truncate(DISK_MIB << 20)
    subprocess.run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(out)],
                   input=f"label: dos\nstart={PART_START}, size={PART_MIB * 2048}, type=c, bootable\n",
                   text=True, check=True, capture_output=True, timeout=60)  # fmt: skip
    boot = (GRUB_PC / "boot.img").read_bytes()
    with out.open("r+b") as f:
        f.seek(PART_START * 512)
        f.write(part.read_bytes())
        f.seek(512)  # core.img from sector 1; its first sector (diskboot) loads the rest from sector 2
        f.write(core.read_bytes())
        f.seek(512 + 500)
        f.write(struct.pack("<QH", 2, core_sectors - 1))
        f.seek(0)
        f.write(boot[:440])
        f.seek(0x5C)
        f.write(struct.pack("<Q", 1))
        f.seek(0x66)
        f.write(b"\x90\x90")
    shutil.rmtree(work, ignore_errors=True)
    return out
