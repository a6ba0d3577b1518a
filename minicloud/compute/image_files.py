"""The node's image store on disk: import files (from allowed directories, or downloaded by ``image_download``),
check them, keep them by image id. The image services (:mod:`minicloud.compute.images`) call it.

Layout: ``<data_dir>/images/<image id>/`` holds ``disk`` (qcow2 or raw) or ``kernel`` + ``initrd``. An import is
staged in ``<data_dir>/images/.staging-<id>`` and renamed into place only once every check passed, so a failed import
leaves nothing behind; the caller commits the image record afterwards and removes the directory again if that fails.
The format is what ``qemu-img info`` finds, never what the user says; disks with a backing file are refused (they
would let an image read any file on the node), and so are qcow2 disks with an external data file.

Everything here is blocking: call it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from minicloud import errors

CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredFile:
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class ImportResult:
    boot: str  # "disk" | "kernel"
    format: str | None
    virtual_size_bytes: int | None
    files: dict[str, StoredFile] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files.values())

    @property
    def sha256(self) -> str:
        return self.files["disk" if self.boot == "disk" else "kernel"].sha256


def _invalid(param: str, message: str) -> errors.ValidationFailed:
    return errors.ValidationFailed(message, invalid_params=[{"name": param, "reason": message}])


def allowed_source(param: str, path: str, allowed_dirs: list[Path]) -> Path:
    """``path`` resolved (symlinks followed) if it is a regular file inside one of ``allowed_dirs``."""
    resolved = Path(os.path.realpath(path))
    roots = [Path(os.path.realpath(d)) for d in allowed_dirs]
    if not any(resolved == r or resolved.is_relative_to(r) for r in roots):
        shown = ", ".join(str(r) for r in roots)
        raise errors.Forbidden(
            f"{param} '{path}' is outside the directories images may be imported from ({shown}); copy the file "
            "there, or add its directory to compute.image_dirs in /etc/minicloud/minicloud.toml"
        )
    if not resolved.is_file():
        raise _invalid(param, f"{param} '{path}' does not exist on the node or is not a regular file")
    return resolved


def _copy_hashing(src: Path, dst: Path) -> StoredFile:
    """Copy ``src`` to ``dst`` hashing it; all-zero chunks become holes, so a thin (sparse) image stays thin."""
    digest = hashlib.sha256()
    size = 0
    zeros = bytes(CHUNK)
    with src.open("rb") as fin, dst.open("wb") as fout:
        while chunk := fin.read(CHUNK):
            digest.update(chunk)
            if chunk == zeros[: len(chunk)]:
                fout.seek(len(chunk), os.SEEK_CUR)
            else:
                fout.write(chunk)
            size += len(chunk)
        fout.truncate(size)  # a file ending in a hole gets its length
        fout.flush()
        os.fsync(fout.fileno())
    return StoredFile(size, digest.hexdigest())


def qemu_img_info(path: Path) -> dict:
    """``qemu-img info --output=json`` of ``path``; a problem naming the failure when qemu-img can't read it."""
    try:
        out = subprocess.run(
            ["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True, timeout=60, check=False
        )
    except FileNotFoundError:
        raise errors.Unavailable("qemu-img is not installed on this node (Debian package qemu-utils)") from None
    if out.returncode != 0:
        raise _invalid("path", f"the file is not a readable disk image: {out.stderr.strip()[-300:]}")
    return json.loads(out.stdout)


def check_disk(path: Path, expected: str | None) -> tuple[str, int]:
    """The disk's real format and virtual size. Refuses unknown formats, backing files and corrupt qcow2."""
    info = qemu_img_info(path)
    fmt = info.get("format")
    if fmt not in ("qcow2", "raw"):
        raise _invalid("format", f"qemu-img finds a {fmt} image; only qcow2 and raw images can be imported")
    if expected and fmt != expected:
        raise _invalid("format", f"you said the image is {expected}, but qemu-img finds {fmt}; fix --format or omit it")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise _invalid("path", "the image has a backing file; flatten it first (`qemu-img convert -O qcow2 IN OUT`)")
    if ((info.get("format-specific") or {}).get("data") or {}).get("data-file"):
        # Like a backing file, an external data file names another file on the node: the image would read it.
        raise _invalid(
            "path", "the qcow2 image keeps its data in an external file; make a self-contained copy first "
            "(`qemu-img convert -O qcow2 IN OUT`)"
        )  # fmt: skip
    if fmt == "qcow2":
        check = subprocess.run(
            ["qemu-img", "check", "--output=json", "-f", "qcow2", str(path)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        # 0: clean; 3: only leaked clusters (wasted space, harmless); 1: the check could not finish; 2: corrupt.
        if check.returncode not in (0, 3):
            raise _invalid("path", f"the qcow2 image is corrupt (qemu-img check exit {check.returncode}); re-create it")
    return fmt, int(info["virtual-size"])


_KERNEL_MAGIC = (b"HdrS", 0x202)  # x86 boot protocol header of a bzImage


def check_kernel(path: Path) -> None:
    with path.open("rb") as f:
        head = f.read(0x210)
    magic, offset = _KERNEL_MAGIC
    if head[:4] != b"\x7fELF" and head[offset : offset + 4] != magic:
        raise _invalid("kernel", "the kernel is neither an x86 bzImage (vmlinuz) nor an ELF vmlinux")


def import_files(
    store_root: Path,
    image_id: str,
    *,
    allowed_dirs: list[Path],
    path: str | None = None,
    expected_format: str | None = None,
    expected_sha256: str | None = None,
    kernel: str | None = None,
    initrd: str | None = None,
) -> ImportResult:
    """Stage, check and move the image's files (on the node) into ``store_root/image_id``. All or nothing."""
    check_sources(path=path, url=None, kernel=kernel, initrd=initrd, sha256=expected_sha256)
    # Check every source before copying anything.
    sources = {}
    if path is not None:
        sources["disk"] = allowed_source("path", path, allowed_dirs)
    if kernel is not None:
        sources["kernel"] = allowed_source("kernel", kernel, allowed_dirs)
        check_kernel(sources["kernel"])
    if initrd is not None:
        sources["initrd"] = allowed_source("initrd", initrd, allowed_dirs)
    staging = new_staging(store_root, image_id)
    try:
        files = {}
        for name, src in sources.items():
            files[name] = _copy_hashing(src, staging / name)
        fmt = vsize = None
        boot = "kernel" if kernel is not None else "disk"
        if boot == "disk":
            check_sha256(files["disk"].sha256, expected_sha256)
            fmt, vsize = check_disk(staging / "disk", expected_format)
        os.rename(staging, store_root / image_id)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ImportResult(boot=boot, format=fmt, virtual_size_bytes=vsize, files=files)


def check_sources(
    *, path: str | None, url: str | None, kernel: str | None, initrd: str | None, sha256: str | None
) -> None:
    """Refuses a request that does not name exactly one source, or pairs options that do not go together."""
    if sum(x is not None for x in (path, url, kernel)) != 1:
        raise errors.ValidationFailed(
            "give exactly one source: path (a disk file on the node), url (a disk to download) or kernel (with "
            "an optional initrd) for direct-kernel boot",
            invalid_params=[{"name": "path", "reason": "exactly one of path, url, kernel"}],
        )
    if initrd is not None and kernel is None:
        raise _invalid("initrd", "initrd only goes with kernel")
    if sha256 is not None and kernel is not None:
        raise _invalid("sha256", "sha256 checks a disk image (path or url); leave it out for kernel + initrd")


def check_sha256(actual: str, expected: str | None) -> None:
    if expected is not None and actual != expected.lower():
        raise _invalid("sha256", f"the image's SHA-256 is {actual}, not the expected {expected.lower()}")


def new_staging(store_root: Path, image_id: str) -> Path:
    """A fresh, private staging directory for ``image_id``; the stray collector removes it if it is abandoned."""
    store_root.mkdir(parents=True, exist_ok=True, mode=0o700)
    staging = store_root / f".staging-{image_id}"
    staging.mkdir(mode=0o700)
    return staging


def finish_disk(store_root: Path, image_id: str, staging: Path, expected_format: str | None) -> tuple[str, int]:
    """Check the disk staged in ``staging`` and move it into place as ``image_id``: (format, virtual size).
    On any failure the staging directory is removed: nothing is kept."""
    try:
        fmt, vsize = check_disk(staging / "disk", expected_format)
        os.rename(staging, store_root / image_id)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return fmt, vsize


def remove(store_root: Path, image_id: str) -> None:
    """Delete the image's files; idempotent."""
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(store_root / image_id)


def stray_entries(store_root: Path, known_ids: set[str], *, idle_seconds: float, now: float) -> list[Path]:
    """Directories in the store that no image record names and nothing has written to for ``idle_seconds``: an
    image deleted through another node's API, a crash between import and commit, an abandoned staging directory.
    (An import in progress keeps writing its staging files, and commits right after its rename.)"""
    if not store_root.is_dir():
        return []
    strays = []
    for entry in store_root.iterdir():
        if not entry.is_dir() or entry.name in known_ids:
            continue
        try:
            newest = max([entry.stat().st_mtime, *(f.stat().st_mtime for f in entry.iterdir())])
        except FileNotFoundError:
            continue  # removed meanwhile
        if now - newest >= idle_seconds:
            strays.append(entry)
    return strays
