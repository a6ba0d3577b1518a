"""The backups reconciler's sweep of interrupted restores: ``rst-<volume id>`` images whose volume is gone or being
deleted are removed (snapshots first); those of a volume still wanted, and other images, are left alone; a refusal
(an image a restore still writes) is tried again later. Runs at most every SWEEP_EVERY seconds."""

from __future__ import annotations

from types import SimpleNamespace

from agent.storage import backup
from agent.storage.driver import StorageError


class Store:
    def __init__(self, volumes):
        self.volumes = volumes

    async def get(self, kind, id_):
        assert kind == "volume"
        spec = self.volumes.get(id_)
        return None if spec is None else SimpleNamespace(spec=spec)


class Driver:
    name = "ceph"
    pool = "minicloud"

    async def list(self):
        return ["vol-live", "rst-vol-gone", "rst-vol-live", "rst-vol-del", "rst-vol-busy", "img-x"]


def _reconciler(monkeypatch, calls):
    r = backup.BackupReconciler.__new__(backup.BackupReconciler)
    r.store = Store({"vol-live": {"deleted": False}, "vol-del": {"deleted": True}})
    local = SimpleNamespace(name="local", pool="")
    r.storage = SimpleNamespace(pools=lambda: {"p1": Driver(), "p2": local})
    r._swept_at = None

    async def rbd(driver, *args, what):
        calls.append(args)
        if args[0] == "rm" and args[-1].endswith("rst-vol-busy"):
            raise StorageError("image has watchers")
        return ""

    monkeypatch.setattr(r, "_rbd", rbd)
    return r


async def test_interrupted_restores_of_gone_volumes_are_swept(monkeypatch):
    calls: list[tuple] = []
    r = _reconciler(monkeypatch, calls)
    removed = await r.sweep_restores()
    assert removed == ["rst-vol-gone", "rst-vol-del"]
    assert ("snap", "purge", "--no-progress", "minicloud/rst-vol-gone") in calls
    assert ("rm", "--no-progress", "minicloud/rst-vol-gone") in calls
    assert not any(c[-1].endswith(("rst-vol-live", "vol-live", "img-x")) for c in calls)


async def test_the_sweep_key_runs_at_most_every_interval(monkeypatch):
    calls: list[tuple] = []
    r = _reconciler(monkeypatch, calls)
    assert backup.SWEEP_KEY in await _keys(r, monkeypatch)
    await r.reconcile(backup.SWEEP_KEY)
    first = len(calls)
    await r.reconcile(backup.SWEEP_KEY)
    assert first > 0 and len(calls) == first
    r._swept_at -= backup.SWEEP_EVERY
    await r.reconcile(backup.SWEEP_KEY)
    assert len(calls) == 2 * first


async def _keys(r, monkeypatch):
    async def no_records(store, kind, **kw):
        return []

    monkeypatch.setattr(backup, "list_all", no_records)
    r.node = "n1"
    return await r.all_keys()
