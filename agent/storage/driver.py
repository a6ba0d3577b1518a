"""Volume drivers: the data operations on one storage pool behind one protocol, their registry and the in-memory fake.

A driver manages the volumes of one pool: ``ceph`` (RBD images in a RADOS pool, :mod:`agent.storage.rbd`) or
``local`` (qcow2 files in a directory, :mod:`agent.storage.local`). It knows nothing of records: the storage
reconciler decides, the driver does. Names inside a pool are ids (``vol-…``, ``img-…``, ``<instance id>-root``;
snapshots ``snap-…``, an image's ``base``).

Contract shared by every driver (the fake below is the reference; the integration tests hold the real ones to it):

- The only exception raised is :class:`StorageError` (``str()`` is for humans and never contains a key);
  :class:`InUse` when something depends on the object (a snapshot with clones, an image open by a guest),
  :class:`NotFound` when an operation needs an object that is not there (a resize of a missing volume, a clone of a
  missing snapshot).
- Creates are idempotent: ``create`` of a volume that exists with that size, ``snapshot`` of a snapshot that exists,
  ``clone`` onto a volume that is already that clone, ``import_file`` onto a volume that exists (an import is
  written under a temporary name and renamed when complete, so an existing volume is a complete one).
- Deletes are idempotent: a volume or snapshot that is not there is deleted.
- ``resize`` only grows; asking for the current size is a no-op, a smaller size is refused.
- ``delete`` removes the volume's snapshots with it, unless one of them has clones (:class:`InUse` naming them).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol


class StorageError(Exception):
    """A storage operation failed; ``str(exc)`` says what happened, for humans (never a secret)."""


class InUse(StorageError):
    """The object cannot be changed or removed because something depends on it (clones, a running guest)."""


class NotFound(StorageError):
    """The volume or snapshot the operation needs does not exist."""


@dataclass(frozen=True)
class DiskSource:
    """Where a volume's data is, as a libvirt ``<disk>`` needs it.

    ``kind='file'``: ``path`` to the file, ``format`` ``qcow2`` or ``raw``. ``kind='rbd'``: ``pool``/``image`` in
    Ceph, reached through the MONs ``hosts`` (address, port) as cephx ``user`` whose key is in the libvirt secret
    ``secret_uuid``; always ``raw``.
    """

    kind: Literal["file", "rbd"]
    path: str = ""
    format: str = "qcow2"
    pool: str = ""
    image: str = ""
    hosts: tuple[tuple[str, int], ...] = ()
    user: str = ""
    secret_uuid: str = ""


class VolumeDriver(Protocol):
    """The volumes of one pool. See the module docstring for the contract every method keeps."""

    name: str

    async def create(self, vol: str, size_bytes: int) -> None:
        """A blank volume of ``size_bytes``; done if it exists with that size (StorageError if another size)."""

    async def clone(self, parent: str, snap: str, vol: str, size_bytes: int) -> None:
        """``vol`` as a copy-on-write clone of ``parent@snap``, grown to ``size_bytes`` if that is larger."""

    async def import_file(self, src: Path, vol: str) -> int:
        """Write a qcow2 or raw file into a new volume in the pool's format; returns its virtual size in bytes."""

    async def resize(self, vol: str, size_bytes: int) -> None:
        """Grow ``vol`` to ``size_bytes`` (equal: nothing to do; smaller: StorageError)."""

    async def delete(self, vol: str) -> None:
        """Remove ``vol`` and its snapshots; done if missing; InUse if a snapshot has clones or a guest has it open."""

    async def snapshot(self, vol: str, snap: str, *, protect: bool = False) -> None:
        """Take snapshot ``snap`` of ``vol`` (done if it exists); ``protect`` makes it a base for clones."""

    async def delete_snapshot(self, vol: str, snap: str) -> None:
        """Remove ``vol@snap`` (unprotecting it first); done if missing; InUse while clones depend on it."""

    async def rollback(self, vol: str, snap: str) -> None:
        """Make ``vol``'s content that of ``snap`` (the volume must not be in use by a guest)."""

    async def children(self, vol: str, snap: str) -> list[str]:
        """The volumes cloned from ``vol@snap`` that still depend on it, sorted."""

    async def flatten(self, vol: str) -> None:
        """Copy the parent's data into the clone ``vol`` so it no longer depends on it (done if not a clone)."""

    async def exists(self, vol: str) -> bool: ...

    async def size(self, vol: str) -> int | None:
        """The virtual size in bytes, or None when ``vol`` does not exist."""

    async def list(self) -> list[str]:
        """The pool's volumes, sorted (temporary import names excluded)."""

    async def snapshots(self, vol: str) -> list[str]:
        """``vol``'s snapshots, sorted (NotFound if ``vol`` does not exist)."""

    async def partials(self) -> dict[str, float]:
        """What interrupted creates or imports left under their temporary names (which :meth:`list` hides): volume
        name → seconds since it was last written (0 when unknown)."""

    async def delete_partial(self, vol: str) -> None:
        """Remove ``vol``'s temporary leftover (done if missing); InUse while a writer still has it open."""

    def source(self, vol: str) -> DiskSource:
        """How a guest reaches ``vol`` (no I/O)."""


# --- helpers shared by the drivers -------------------------------------------------------------------------------

QCOW2_MAGIC = b"QFI\xfb"


@dataclass(frozen=True)
class Qcow2Header:
    """The fields of a qcow2 header the drivers need (read without spawning ``qemu-img``)."""

    version: int
    size: int
    backing_file: str
    incompatible_features: int


def read_qcow2_header(path: Path) -> Qcow2Header | None:
    """The qcow2 header of ``path``, or None when the file is not qcow2. Raises OSError when it cannot be read."""
    with open(path, "rb") as f:
        head = f.read(104)
        if len(head) < 72 or head[:4] != QCOW2_MAGIC:
            return None
        version, backing_offset, backing_size = struct.unpack(">IQI", head[4:20])
        (size,) = struct.unpack(">Q", head[24:32])
        incompatible = struct.unpack(">Q", head[72:80])[0] if version >= 3 and len(head) >= 80 else 0
        backing = ""
        if backing_offset and backing_size:
            f.seek(backing_offset)
            backing = f.read(backing_size).decode(errors="replace")
    return Qcow2Header(version=version, size=size, backing_file=backing, incompatible_features=incompatible)


def probe_image(src: Path) -> str:
    """The format of an image file to import, ``qcow2`` or ``raw``, decided from its header (never by letting QEMU
    guess, which would let a raw image posing as qcow2 name a host file as its backing file).

    Raises StorageError for a qcow2 file that refers to other files (a backing file or an external data file): an
    uploaded image must be self-contained."""
    try:
        header = read_qcow2_header(src)
    except OSError as exc:
        raise StorageError(f"cannot read {src}: {exc.strerror}") from None
    if header is None:
        return "raw"
    if header.backing_file:
        raise StorageError(
            f"{src.name} is a qcow2 overlay (backing file {header.backing_file!r}): import a whole image"
        )
    if header.incompatible_features & 0b100:
        raise StorageError(f"{src.name} keeps its data in an external file: import a self-contained qcow2 image")
    return "qcow2"


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str

    def last_line(self) -> str:
        """The last non-empty line of stderr (the tools put their reason there), or the exit status."""
        lines = [ln.strip() for ln in self.stderr.splitlines() if ln.strip()]
        return lines[-1] if lines else f"exit status {self.returncode}"


async def run_tool(argv: list[str], *, timeout: float, what: str) -> Completed:
    """Run a command without blocking the event loop and return its status and output (never raises on a non-zero
    exit: callers decide). Raises StorageError when the program is missing or runs past ``timeout`` (it is killed);
    ``what`` names the operation in those messages."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except FileNotFoundError:
        raise StorageError(f"{what}: {argv[0]} is not installed") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise StorageError(f"{what} did not finish within {timeout:g} s") from None
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    return Completed(proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))


# --- the fake ------------------------------------------------------------------------------------------------------


@dataclass
class _FakeSnap:
    size: int
    protected: bool = False
    data: bytes = b""


@dataclass
class _FakeVol:
    size: int
    data: bytes = b""
    snaps: dict[str, _FakeSnap] = field(default_factory=dict)
    parent: tuple[str, str] | None = None


class FakeVolumeDriver:
    """Volumes in memory with the semantics of the RBD driver (the reference for the contract).

    Each volume has a ``data`` value standing for its content: snapshots copy it, ``rollback`` restores it, clones
    start from the snapshot's. Clones are children of their snapshot until flattened or deleted, whether or not the
    snapshot is protected. Tests may set ``in_use`` (volume names a guest has open: ``delete`` and ``rollback``
    raise InUse) and ``fail_next`` (method names whose next call raises StorageError once). ``calls`` records each
    call as ``(method, args...)``.
    """

    def __init__(self, name: str = "fake") -> None:
        self.name = name
        self.vols: dict[str, _FakeVol] = {}
        self.in_use: set[str] = set()
        self.fail_next: set[str] = set()
        self.calls: list[tuple[Any, ...]] = []
        #: Temporary leftovers of interrupted imports: volume name → seconds since last written.
        self.parts: dict[str, float] = {}

    def _enter(self, method: str, *args: Any) -> None:
        self.calls.append((method, *args))
        if method in self.fail_next:
            self.fail_next.discard(method)
            raise StorageError(f"fake {method} failure")

    def _vol(self, vol: str) -> _FakeVol:
        v = self.vols.get(vol)
        if v is None:
            raise NotFound(f"volume {vol} does not exist")
        return v

    def _children(self, vol: str, snap: str) -> list[str]:
        return sorted(n for n, v in self.vols.items() if v.parent == (vol, snap))

    async def create(self, vol: str, size_bytes: int) -> None:
        self._enter("create", vol, size_bytes)
        existing = self.vols.get(vol)
        if existing is not None:
            if existing.size != size_bytes:
                raise StorageError(f"volume {vol} already exists with {existing.size} bytes, not {size_bytes}")
            return
        self.vols[vol] = _FakeVol(size_bytes)

    async def clone(self, parent: str, snap: str, vol: str, size_bytes: int) -> None:
        self._enter("clone", parent, snap, vol, size_bytes)
        p = self._vol(parent)
        s = p.snaps.get(snap)
        if s is None:
            raise NotFound(f"snapshot {parent}@{snap} does not exist")
        existing = self.vols.get(vol)
        if existing is not None and existing.parent != (parent, snap):
            raise StorageError(f"volume {vol} already exists and is not a clone of {parent}@{snap}")
        if existing is None:
            self.vols[vol] = existing = _FakeVol(s.size, data=s.data, parent=(parent, snap))
        existing.size = max(existing.size, size_bytes)

    async def import_file(self, src: Path, vol: str) -> int:
        self._enter("import_file", src, vol)
        existing = self.vols.get(vol)
        if existing is not None:
            return existing.size
        try:
            data = await asyncio.to_thread(Path(src).read_bytes)
        except OSError as exc:
            raise StorageError(f"cannot read {src}: {exc.strerror}") from None
        self.vols[vol] = _FakeVol(len(data), data=data)
        return len(data)

    async def resize(self, vol: str, size_bytes: int) -> None:
        self._enter("resize", vol, size_bytes)
        v = self._vol(vol)
        if size_bytes < v.size:
            raise StorageError(f"volume {vol} has {v.size} bytes: it can only grow, not shrink to {size_bytes}")
        v.size = size_bytes

    async def delete(self, vol: str) -> None:
        self._enter("delete", vol)
        v = self.vols.get(vol)
        if v is None:
            return
        if vol in self.in_use:
            raise InUse(f"volume {vol} is open by a guest")
        for snap in sorted(v.snaps):
            if kids := self._children(vol, snap):
                raise InUse(f"snapshot {vol}@{snap} has clones: {', '.join(kids)}")
        del self.vols[vol]

    async def snapshot(self, vol: str, snap: str, *, protect: bool = False) -> None:
        self._enter("snapshot", vol, snap, protect)
        v = self._vol(vol)
        s = v.snaps.setdefault(snap, _FakeSnap(v.size, data=v.data))
        s.protected = s.protected or protect

    async def delete_snapshot(self, vol: str, snap: str) -> None:
        self._enter("delete_snapshot", vol, snap)
        v = self.vols.get(vol)
        if v is None or snap not in v.snaps:
            return
        if kids := self._children(vol, snap):
            raise InUse(f"snapshot {vol}@{snap} has clones: {', '.join(kids)}")
        del v.snaps[snap]

    async def rollback(self, vol: str, snap: str) -> None:
        self._enter("rollback", vol, snap)
        v = self._vol(vol)
        s = v.snaps.get(snap)
        if s is None:
            raise NotFound(f"snapshot {vol}@{snap} does not exist")
        if vol in self.in_use:
            raise InUse(f"volume {vol} is open by a guest: stop it before reverting")
        v.data = s.data

    async def children(self, vol: str, snap: str) -> list[str]:
        self._enter("children", vol, snap)
        return self._children(vol, snap)

    async def flatten(self, vol: str) -> None:
        self._enter("flatten", vol)
        self._vol(vol).parent = None

    async def exists(self, vol: str) -> bool:
        return vol in self.vols

    async def size(self, vol: str) -> int | None:
        v = self.vols.get(vol)
        return None if v is None else v.size

    async def list(self) -> list[str]:
        return sorted(self.vols)

    async def snapshots(self, vol: str) -> list[str]:
        return sorted(self._vol(vol).snaps)

    async def partials(self) -> dict[str, float]:
        return dict(self.parts)

    async def delete_partial(self, vol: str) -> None:
        self._enter("delete_partial", vol)
        if vol in self.in_use:
            raise InUse(f"the import into {vol} is still writing")
        self.parts.pop(vol, None)

    def source(self, vol: str) -> DiskSource:
        return DiskSource(kind="file", path=f"/fake/{self.name}/{vol}.qcow2", format="qcow2")

    # test helpers
    def write(self, vol: str, data: bytes) -> None:
        """Stand-in for a guest writing ``data`` to ``vol``."""
        self._vol(vol).data = data

    def read(self, vol: str) -> bytes:
        return self._vol(vol).data


# --- registry ------------------------------------------------------------------------------------------------------


def _rbd(**settings: Any) -> VolumeDriver:
    from agent.storage.rbd import RbdDriver

    return RbdDriver(**settings)


def _local(**settings: Any) -> VolumeDriver:
    from agent.storage.local import LocalDriver

    return LocalDriver(**settings)


def _fake(**settings: Any) -> VolumeDriver:
    return FakeVolumeDriver(**settings)


DRIVERS: dict[str, Callable[..., VolumeDriver]] = {"ceph": _rbd, "local": _local, "fake": _fake}


def make_volume_driver(driver: str, **settings: Any) -> VolumeDriver:
    """The driver a pool's ``spec.driver`` names, built from ``settings`` (its constructor's keyword arguments):
    ``ceph``: ``pool, conf, keyring, user, hosts, secret_uuid``; ``local``: ``root``; ``fake``: ``name``."""
    try:
        factory = DRIVERS[driver]
    except KeyError:
        raise StorageError(f"no volume driver {driver!r} (known: {', '.join(sorted(DRIVERS))})") from None
    return factory(**settings)
