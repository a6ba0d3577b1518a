"""Leftovers of an interrupted import (``img-….part``, which the drivers' ``list()`` hides) are swept: at once when no
record names them, after :data:`PART_IDLE` when one does (a stalled import), never while a writer has them open. The
local driver reports and removes its ``.qcow2.part`` files; the RBD driver is proven on the real cluster in
tests/integration/test_storage_partials_ceph.py."""

from __future__ import annotations

import os
import time

from agent.reconcilers.storage import NODE_KEY, PART_IDLE
from agent.storage.local import LocalDriver
from minicloud.compute.kinds import IMAGE, ImageSpec
from tests.unit.agent.test_storage_reconciler import _pool, create, ready, store, volume, world  # noqa: F401


async def test_the_sweep_removes_import_leftovers_no_record_names_or_nobody_writes(ready):  # noqa: F811
    """They were never removed: ``list()`` hides ``.part`` names, so the sweep never saw them."""
    pool = _pool(ready)
    spec = ImageSpec(boot="disk", format="raw", size_bytes=4, sha256="x", node="n1", pool="pool-ceph")
    await create(ready.store, IMAGE, "live", spec, id="img-live")
    await create(ready.store, IMAGE, "stalled", spec, id="img-stalled")
    vid = await volume(ready.store)
    pool.parts = {
        "img-gone": 5.0,  # the image was deleted after a crash mid-import
        "img-live": 5.0,  # being imported now
        "img-stalled": PART_IDLE + 1,  # nothing wrote it for an hour: a dead import (a retry starts afresh)
        "img-open": PART_IDLE + 1,  # still open by its writer: the driver refuses
        vid: 1.0,
        "vol-gone": 1.0,
        "i-1-root": PART_IDLE + 1,  # not a name of ours: left alone
    }
    pool.in_use.add("img-open")
    await ready.r.reconcile(NODE_KEY)
    assert sorted(pool.parts) == sorted(["img-live", "img-open", vid, "i-1-root"])


async def test_the_local_driver_reports_and_removes_its_part_files(tmp_path):
    drv = LocalDriver(root=tmp_path / "pool")
    assert await drv.partials() == {}
    (tmp_path / "pool").mkdir()
    old = tmp_path / "pool" / "img-1.qcow2.part"
    old.write_bytes(b"half")
    then = time.time() - 2 * PART_IDLE
    os.utime(old, (then, then))
    (tmp_path / "pool" / "vol-1.qcow2.part").write_bytes(b"new")
    (tmp_path / "pool" / "vol-2.qcow2").write_bytes(b"whole")
    parts = await drv.partials()
    assert sorted(parts) == ["img-1", "vol-1"] and parts["img-1"] > PART_IDLE and parts["vol-1"] < 60
    await drv.delete_partial("img-1")
    await drv.delete_partial("img-1")  # gone already
    assert sorted(await drv.partials()) == ["vol-1"] and await drv.list() == ["vol-2"]
