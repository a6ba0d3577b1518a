"""The ``local`` volume driver: a pool is a directory of qcow2 files on this node (``<root>/<vol>.qcow2``).

How the RBD notions map onto qcow2 (every operation goes through ``qemu-img``, whose image locks also tell us when a
running guest has a file open: that is :class:`InUse`):

- **Snapshots** are qcow2 internal snapshots (``qemu-img snapshot -c/-a/-d``): O(1), inside the volume's file, gone
  with it. ``qemu-img`` cannot snapshot or roll back a file a running guest has open, so here snapshots and reverts
  need a detached volume (or a stopped guest); the RBD driver has no such limit.
- **Protection** freezes the volume: ``snapshot(vol, snap, protect=True)`` records ``snap`` in ``<vol>.frozen`` and
  from then on the file must not change (``resize`` and ``rollback`` are refused; images, the only volumes protected
  in practice, are never attached). Because the file is frozen at ``snap``, its current content *is* ``snap``'s, so a
  clone of ``vol@snap`` can be a qcow2 overlay whose backing file is ``<vol>.qcow2`` (relative name, backing format
  qcow2): O(1), whatever the size. Only the snapshot taken with ``protect=True`` can be protected (one per volume);
  protecting an older snapshot is refused, since the file no longer holds its content.
- **Clones of an unprotected snapshot** are full copies of that snapshot (``qemu-img convert -l snapshot.name=…``):
  O(size), independent of the parent, and so never its children.
- **Children** of ``vol@snap`` are the overlays in the pool whose backing file is ``<vol>.qcow2`` (read from their
  qcow2 headers), when ``snap`` is the frozen snapshot; none otherwise. ``delete_snapshot`` of the frozen snapshot
  and ``delete`` of the volume raise :class:`InUse` while there are any; ``flatten`` (``qemu-img rebase -b ''``)
  copies the backing data into an overlay and releases it.
- Creates and imports write ``<vol>.qcow2.part`` and rename it when complete, so ``<vol>.qcow2`` is always a whole
  volume and a repeated call after a crash starts afresh.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path

from agent.storage.driver import (
    Completed,
    DiskSource,
    InUse,
    NotFound,
    StorageError,
    probe_image,
    read_qcow2_header,
    run_tool,
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
SUFFIX = ".qcow2"
PART = ".qcow2.part"
FROZEN = ".frozen"


def _check_name(name: str, what: str = "volume") -> str:
    if not _NAME.fullmatch(name) or name.endswith((SUFFIX, PART, FROZEN)):
        raise StorageError(f"{what} name {name!r} is not valid (letters, digits, '.', '_', '-')")
    return name


def _locked(result: Completed) -> bool:
    """Whether qemu-img failed because another process (a running guest's QEMU) holds the image's lock."""
    return "lock" in result.stderr and ("Failed to get" in result.stderr or "another process" in result.stderr)


class LocalDriver:
    """The volumes of one ``local`` pool: qcow2 files under ``root`` (created when the first volume is)."""

    name = "local"

    def __init__(self, root: Path, *, timeout: float = 60.0, copy_timeout: float = 3600.0) -> None:
        self.root = Path(root)
        self.timeout = timeout
        self.copy_timeout = copy_timeout

    # -- plumbing ----------------------------------------------------------------------------------------------------
    def path(self, vol: str) -> Path:
        return self.root / f"{_check_name(vol)}{SUFFIX}"

    def _part(self, vol: str) -> Path:
        return self.root / f"{vol}{PART}"

    def _frozen_file(self, vol: str) -> Path:
        return self.root / f"{vol}{FROZEN}"

    def _frozen(self, vol: str) -> str | None:
        try:
            return self._frozen_file(vol).read_text().strip() or None
        except FileNotFoundError:
            return None

    async def _qemu_img(self, args: list[str], what: str, *, timeout: float | None = None) -> Completed:
        result = await run_tool(["qemu-img", *args], timeout=timeout or self.timeout, what=what)
        if result.returncode != 0:
            if _locked(result):
                raise InUse(f"{what}: the volume is open by a running guest")
            raise StorageError(f"{what}: {result.last_line()}")
        return result

    def _header_size(self, path: Path) -> int:
        try:
            header = read_qcow2_header(path)
        except OSError as exc:
            raise StorageError(f"cannot read {path.name}: {exc.strerror}") from None
        if header is None:
            raise StorageError(f"{path.name} is not a qcow2 file")
        return header.size

    def _fresh_part(self, vol: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        part = self._part(vol)
        part.unlink(missing_ok=True)
        return part

    async def _snapshot_names(self, vol: str) -> list[str]:
        path = self.path(vol)
        if not path.exists():
            raise NotFound(f"volume {vol} does not exist")
        # --force-share: listing must work while a guest has the file open (it only reads the snapshot table).
        info = await self._qemu_img(
            ["info", "--force-share", "--output=json", "-f", "qcow2", str(path)], f"reading volume {vol}"
        )
        return sorted(s["name"] for s in json.loads(info.stdout).get("snapshots", []))

    async def _check_not_open(self, vol: str, what: str) -> None:
        """InUse when a running guest holds ``vol``'s lock (``qemu-img info`` without force-share fails then)."""
        await self._qemu_img(["info", "--output=json", "-f", "qcow2", str(self.path(vol))], what)

    def _overlays_of(self, vol: str) -> list[str]:
        target = self.path(vol).resolve()
        out = []
        for f in sorted(self.root.glob(f"*{SUFFIX}")):
            try:
                header = read_qcow2_header(f)
            except OSError:
                continue
            if header is not None and header.backing_file:
                backing = Path(header.backing_file)
                if not backing.is_absolute():
                    backing = f.parent / backing
                if backing.resolve() == target:
                    out.append(f.name.removesuffix(SUFFIX))
        return out

    # -- VolumeDriver ------------------------------------------------------------------------------------------------
    async def create(self, vol: str, size_bytes: int) -> None:
        path = self.path(vol)
        if path.exists():
            have = self._header_size(path)
            if have != size_bytes:
                raise StorageError(f"volume {vol} already exists with {have} bytes, not {size_bytes}")
            return
        part = self._fresh_part(vol)
        await self._qemu_img(["create", "-q", "-f", "qcow2", str(part), str(size_bytes)], f"creating volume {vol}")
        os.replace(part, path)

    async def clone(self, parent: str, snap: str, vol: str, size_bytes: int) -> None:
        path, parent_path = self.path(vol), self.path(parent)
        _check_name(snap, "snapshot")
        if not path.exists():
            if snap not in await self._snapshot_names(parent):
                raise NotFound(f"snapshot {parent}@{snap} does not exist")
            part = self._fresh_part(vol)
            size = max(size_bytes, self._header_size(parent_path))
            what = f"cloning {parent}@{snap} to {vol}"
            if self._frozen(parent) == snap:
                args = ["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", parent_path.name, str(part), str(size)]
                await self._qemu_img(args, what)
            else:
                args = ["convert", "-f", "qcow2", "-O", "qcow2", "-l", f"snapshot.name={snap}"]
                await self._qemu_img([*args, str(parent_path), str(part)], what, timeout=self.copy_timeout)
                if size > self._header_size(part):
                    await self._qemu_img(["resize", "-q", "-f", "qcow2", str(part), str(size)], what)
            os.replace(part, path)
            return
        header = read_qcow2_header(path)
        if header is not None and header.backing_file and Path(header.backing_file).name != parent_path.name:
            raise StorageError(f"volume {vol} already exists and is not a clone of {parent}@{snap}")
        if size_bytes > self._header_size(path):
            await self.resize(vol, size_bytes)

    async def import_file(self, src: Path, vol: str) -> int:
        path = self.path(vol)
        if path.exists():
            return self._header_size(path)
        fmt = probe_image(Path(src))
        part = self._fresh_part(vol)
        await self._qemu_img(
            ["convert", "-f", fmt, "-O", "qcow2", str(src), str(part)],
            f"importing {Path(src).name} into {vol}",
            timeout=self.copy_timeout,
        )
        os.replace(part, path)
        return self._header_size(path)

    async def resize(self, vol: str, size_bytes: int) -> None:
        path = self.path(vol)
        if not path.exists():
            raise NotFound(f"volume {vol} does not exist")
        have = self._header_size(path)
        if size_bytes == have:
            return
        if size_bytes < have:
            raise StorageError(f"volume {vol} has {have} bytes: it can only grow, not shrink to {size_bytes}")
        if (frozen := self._frozen(vol)) is not None:
            raise InUse(f"volume {vol} is protected (snapshot {frozen} is the base of clones): it cannot change")
        await self._qemu_img(["resize", "-q", "-f", "qcow2", str(path), str(size_bytes)], f"resizing volume {vol}")

    async def delete(self, vol: str) -> None:
        path = self.path(vol)
        self._part(vol).unlink(missing_ok=True)
        if not path.exists():
            self._frozen_file(vol).unlink(missing_ok=True)
            return
        if kids := self._overlays_of(vol):
            frozen = self._frozen(vol) or "?"
            raise InUse(f"snapshot {vol}@{frozen} has clones: {', '.join(kids)}")
        await self._check_not_open(vol, f"deleting volume {vol}")
        path.unlink()
        self._frozen_file(vol).unlink(missing_ok=True)

    async def snapshot(self, vol: str, snap: str, *, protect: bool = False) -> None:
        _check_name(snap, "snapshot")
        existing = await self._snapshot_names(vol)
        frozen = self._frozen(vol)
        if protect and frozen != snap:
            if frozen is not None:
                raise StorageError(f"volume {vol} is already protected at snapshot {frozen}; local volumes have one")
            if snap in existing:
                raise StorageError(
                    f"snapshot {vol}@{snap} already exists: a local snapshot can only be protected when it is taken"
                )
            # The mark first: a crash between the two steps leaves a mark whose snapshot a retry then takes.
            self._frozen_file(vol).write_text(snap + "\n")
            frozen = snap
        if snap in existing:
            return
        try:
            await self._qemu_img(["snapshot", "-c", snap, str(self.path(vol))], f"snapshotting volume {vol}")
        except StorageError:
            if protect and frozen == snap:
                self._frozen_file(vol).unlink(missing_ok=True)
            raise

    async def delete_snapshot(self, vol: str, snap: str) -> None:
        _check_name(snap, "snapshot")
        if not self.path(vol).exists():
            return
        frozen = self._frozen(vol)
        if frozen == snap and (kids := self._overlays_of(vol)):
            raise InUse(f"snapshot {vol}@{snap} has clones: {', '.join(kids)}")
        if snap in await self._snapshot_names(vol):
            await self._qemu_img(["snapshot", "-d", snap, str(self.path(vol))], f"deleting snapshot {vol}@{snap}")
        if frozen == snap:
            self._frozen_file(vol).unlink(missing_ok=True)

    async def rollback(self, vol: str, snap: str) -> None:
        _check_name(snap, "snapshot")
        if snap not in await self._snapshot_names(vol):
            raise NotFound(f"snapshot {vol}@{snap} does not exist")
        if (frozen := self._frozen(vol)) is not None:
            raise InUse(f"volume {vol} is protected (snapshot {frozen} is the base of clones): it cannot change")
        await self._qemu_img(["snapshot", "-a", snap, str(self.path(vol))], f"reverting volume {vol} to {snap}")

    async def children(self, vol: str, snap: str) -> list[str]:
        _check_name(snap, "snapshot")
        if not self.path(vol).exists() or self._frozen(vol) != snap:
            return []
        return self._overlays_of(vol)

    async def flatten(self, vol: str) -> None:
        path = self.path(vol)
        if not path.exists():
            raise NotFound(f"volume {vol} does not exist")
        header = read_qcow2_header(path)
        if header is None or not header.backing_file:
            return
        await self._qemu_img(
            ["rebase", "-f", "qcow2", "-b", "", str(path)], f"flattening volume {vol}", timeout=self.copy_timeout
        )

    async def exists(self, vol: str) -> bool:
        return self.path(vol).exists()

    async def size(self, vol: str) -> int | None:
        path = self.path(vol)
        return self._header_size(path) if path.exists() else None

    async def list(self) -> list[str]:
        with contextlib.suppress(FileNotFoundError):
            return sorted(f.name.removesuffix(SUFFIX) for f in self.root.glob(f"*{SUFFIX}"))
        return []

    async def snapshots(self, vol: str) -> list[str]:
        return await self._snapshot_names(vol)

    async def partials(self) -> dict[str, float]:
        now = time.time()
        found: dict[str, float] = {}
        with contextlib.suppress(FileNotFoundError):
            for f in self.root.glob(f"*{PART}"):
                with contextlib.suppress(FileNotFoundError):
                    found[f.name.removesuffix(PART)] = max(0.0, now - f.stat().st_mtime)
        return dict(sorted(found.items()))

    async def delete_partial(self, vol: str) -> None:
        self._part(_check_name(vol)).unlink(missing_ok=True)

    def source(self, vol: str) -> DiskSource:
        return DiskSource(kind="file", path=str(self.path(vol)), format="qcow2")
