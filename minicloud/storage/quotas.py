"""Per-project storage quotas: volumes, GiB of volumes and snapshots (``[storage]`` ``quota_*``; 0 = unlimited).

Race-free: what a project holds is counted in its ``storageusage`` record (:data:`~minicloud.storage.kinds
.STORAGE_USAGE`), and every create, extend and delete commits :func:`charge`'s op — a compare-and-swap on that record
(a Create when it is the first) — in the same transaction as the change. Two creates that both read "49 of 50" cannot
both commit: the second fails its CAS, reads again (:func:`minicloud.storage.common.retrying`) and is refused. Volumes
and snapshots stop counting when their delete is asked (``spec.deleted``), not when their node removes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from minicloud import errors
from minicloud.core.context import Context
from minicloud.state import Create, Delete, Op, Store, Update
from minicloud.storage.kinds import STORAGE_USAGE, StorageUsageSpec, usage_id


@dataclass(frozen=True)
class Quotas:
    """Limits per project; 0 = unlimited."""

    volumes: int = 50
    volume_gib: int = 2048
    snapshots: int = 100

    @classmethod
    def from_config(cls, config: Any) -> Quotas:
        """From ``config.storage`` (its ``quota_*`` fields); the defaults where a field is missing."""
        section = getattr(config, "storage", None)
        default = cls()
        return cls(
            volumes=getattr(section, "quota_volumes", default.volumes),
            volume_gib=getattr(section, "quota_volume_gib", default.volume_gib),
            snapshots=getattr(section, "quota_snapshots", default.snapshots),
        )


DEFAULT_QUOTAS = Quotas()


async def usage(store: Store, project: str) -> StorageUsageSpec:
    """What ``project`` holds now (zeros when it holds nothing)."""
    record = await store.get(STORAGE_USAGE.name, usage_id(project))
    return STORAGE_USAGE.load(record).spec if record is not None else StorageUsageSpec(project=project)


def _check(what: str, option: str, used: int, delta: int, limit: int, unit: str = "") -> None:
    if delta > 0 and limit > 0 and used + delta > limit:
        raise errors.Conflict(
            f"quota exceeded: {what} {used + delta}{unit} would pass the project's quota of {limit}{unit} "
            f"({used}{unit} used; [storage] {option}); delete some or ask an administrator to raise it"
        )


async def charge(
    ctx: Context,
    store: Store,
    project: str,
    *,
    volumes: int = 0,
    gib: int = 0,
    snapshots: int = 0,
    quotas: Quotas = DEFAULT_QUOTAS,
) -> list[Op]:
    """The op (none, or one) that adds the deltas to ``project``'s usage (a CAS on the revision read), after refusing with 409 a
    growth past a quota (naming it and the numbers). Releases (negative deltas) are never refused and never go
    below zero; the record is deleted when it drops to zero."""
    record = await store.get(STORAGE_USAGE.name, usage_id(project))
    current = STORAGE_USAGE.load(record) if record is not None else None
    spec = current.spec if current is not None else StorageUsageSpec(project=project)
    _check("volumes", "quota_volumes", spec.volumes, volumes, quotas.volumes)
    _check("volume storage", "quota_volume_gib", spec.volume_gib, gib, quotas.volume_gib, " GiB")
    _check("snapshots", "quota_snapshots", spec.snapshots, snapshots, quotas.snapshots)
    new = msgspec.structs.replace(
        spec,
        volumes=max(0, spec.volumes + volumes),
        volume_gib=max(0, spec.volume_gib + gib),
        snapshots=max(0, spec.snapshots + snapshots),
    )
    if current is None:
        if new.volumes == new.volume_gib == new.snapshots == 0:
            return []
        obj = STORAGE_USAGE.new(project="", id=usage_id(project), name=project, spec=new, stamp=ctx.clock())
        return [Create(STORAGE_USAGE.dump(obj))]
    if new.volumes == new.volume_gib == new.snapshots == 0:
        return [Delete(kind=STORAGE_USAGE.name, id=current.id, expect_revision=current.revision)]
    updated = current.replace(spec=new, updated_at=ctx.clock())
    return [Update(STORAGE_USAGE.dump(updated), expect_revision=current.revision)]
