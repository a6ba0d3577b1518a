"""The RBD driver's import leftovers on the run's real Ceph cluster: an ``img-….part`` image (what a crash during
``qemu-img convert`` leaves) is hidden from ``list()``, reported by ``partials()`` with how long nothing wrote it, and
removed by ``delete_partial`` — not while a client still has it open."""

from __future__ import annotations

import asyncio
import subprocess
import uuid

import pytest

from agent.storage import rbd as rbd_mod
from agent.storage.driver import InUse
from agent.storage.rbd import PART, RbdDriver
from tests import ceph

pytestmark = pytest.mark.skipif(not ceph.ceph_installed(), reason=ceph.SKIP_REASON)


def _rbd(drv: RbdDriver, *args: str) -> subprocess.CompletedProcess[str]:
    argv = ["rbd", "--conf", str(drv.conf), "--id", drv.user, "--keyring", str(drv.keyring), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


async def test_an_interrupted_imports_leftover_is_reported_and_removed(ceph_cluster) -> None:  # type: ignore[no-untyped-def]
    h = ceph_cluster
    drv = RbdDriver(pool=h.pool, conf=h.conf, keyring=h.keyring, user=h.user, hosts=[(h.address, h.mon_port)],
                    secret_uuid=str(uuid.uuid4()))  # fmt: skip
    name = f"img-{uuid.uuid4().hex[:10]}"
    assert _rbd(drv, "create", "--size", "4M", f"{drv.pool}/{name}{PART}").returncode == 0
    try:
        assert name not in await drv.list() and f"{name}{PART}" not in await drv.list()
        parts = await drv.partials()
        assert name in parts and 0 <= parts[name] < 600  # just made
        info = await drv._info(f"{name}{PART}")
        assert info is not None and rbd_mod._written_at(info) is not None, info  # Pacific's timestamps are read
        watcher = await asyncio.create_subprocess_exec(  # a writer holding it open, as qemu-img convert does
            "rbd", "--conf", str(drv.conf), "--id", drv.user, "--keyring", str(drv.keyring), "watch",
            f"{drv.pool}/{name}{PART}", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            deadline = asyncio.get_running_loop().time() + 30
            while not await drv._watchers(f"{name}{PART}"):  # registered once `rbd status` lists it
                assert asyncio.get_running_loop().time() < deadline, "rbd watch never registered"
                await asyncio.sleep(0.1)
            with pytest.raises(InUse):
                await drv.delete_partial(name)
            assert name in await drv.partials()
        finally:
            assert watcher.stdin is not None
            watcher.stdin.write(b"\n")  # "press enter to exit": it unwatches (a killed one lingers ~30 s)
            try:
                await asyncio.wait_for(watcher.wait(), 30)
            except TimeoutError:
                watcher.kill()
                await watcher.wait()
        await drv.delete_partial(name)
        await drv.delete_partial(name)  # gone already
        assert name not in await drv.partials()
    finally:
        _rbd(drv, "rm", "--no-progress", f"{drv.pool}/{name}{PART}")
