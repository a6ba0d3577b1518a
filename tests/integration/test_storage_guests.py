"""Guests on Ceph, for real: the compute reconciler with the real libvirt driver (TCG) and the RBD driver on the run's
shared Ceph cluster (fixture ``ceph_cluster``), the busybox test guest from scripts/build-guest-image. An instance in a
ceph pool boots with its root disk on RBD (a network disk through librbd, with a libvirt cephx secret); a volume
cloned from an image's snapshot is hot-plugged into the running guest, which sees it with the image's content, is
grown online (the guest's kernel sees the new size) and unplugged again; deleting the instance leaves no RBD image, domain or secret behind.

The reconciler runs in the test's process with a hand-filled :class:`NodeStorage` (what the storage reconciler
publishes on a node), so the test needs no agent bootstrapping a cluster of its own; tests/integration/
test_storage_node.py covers that path."""

from __future__ import annotations

import asyncio
import base64
import configparser
import contextlib
import shutil
import time
import uuid
from pathlib import Path

import libvirt
import msgspec
import pytest

from agent.compute.libvirt_driver import LibvirtDriver
from agent.reconcilers.compute import ComputeReconciler, root_volume_name
from agent.storage.node import CephSecret, NodeStorage
from agent.storage.rbd import RbdDriver
from minicloud import config as cfgmod
from minicloud.compute.kinds import IMAGE, INSTANCE, ImageFileSpec, ImageSpec, InstanceSpec
from minicloud.state import Create, Txn, Update
from minicloud.state.sqlite import SQLiteStore
from minicloud.storage.kinds import VOLUME, Attachment, VolumeObserved, VolumeSpec

pytestmark = pytest.mark.slow
BOOT_TIMEOUT = 180
POOL_ID = "pool-ceph"
MARKER = "MCVOLMARK0123456"
NODE = "stg1"
# Prints the guest's disks whenever they (or their sizes) change, with the first bytes and the size in 512-byte
# sectors of each virtio disk, as the guest's kernel sees it.
WATCH_DISKS = """#!/bin/sh
(
  seen=""
  while true; do
    now="$(ls /sys/block | tr '\\n' ' ')$(cat /sys/block/vd*/size 2>/dev/null | tr '\\n' ' ')"
    if [ "$now" != "$seen" ]; then
      echo "mc-disks: $(ls /sys/block | tr '\\n' ' ')" >/dev/console
      for d in /sys/block/vd*; do
        n=${d##*/}
        echo "mc-head $n: $(head -c 16 /dev/$n 2>/dev/null | tr -dc 'A-Za-z0-9')" >/dev/console
        echo "mc-size $n: $(cat $d/size)" >/dev/console
      done
      seen="$now"
    fi
    sleep 1
  done
) &
"""


def _admin_key(keyring: Path) -> bytes:
    parser = configparser.ConfigParser()
    parser.read(keyring)
    return base64.b64decode(parser["client.admin"]["key"])


async def _until(what: str, check, timeout: float, step=None):  # type: ignore[no-untyped-def]
    """Run ``step()`` (a reconcile pass) and ``check()`` until it is truthy, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        if step is not None:
            await step()
        value = await check() if asyncio.iscoroutinefunction(check) else check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(1)


def _domain_names(data_dir: Path) -> list[str]:
    conn = libvirt.open("qemu:///system")
    try:
        return [d.name() for d in conn.listAllDomains(0) if str(data_dir) in d.XMLDesc(0)]
    finally:
        conn.close()


def _live_xml(domain_uuid: str) -> str:
    conn = libvirt.open("qemu:///system")
    try:
        return conn.lookupByUUIDString(domain_uuid).XMLDesc(0)
    finally:
        conn.close()


def _secret_exists(secret_uuid: str) -> bool:
    conn = libvirt.open("qemu:///system")
    try:
        conn.secretLookupByUUIDString(secret_uuid)
        return True
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()


async def test_a_guest_boots_from_rbd_and_a_cloned_volume_is_hot_plugged_and_unplugged(
    ceph_cluster, guest_image: Path, tmp_path: Path
):
    h = ceph_cluster
    f = tmp_path / "minicloud.toml"
    f.write_text('[compute]\ndriver = "libvirt"\nstop_timeout = 10\n[network]\nenabled = false\n')
    config = cfgmod.load(f, env={}, overrides={"agent.data_dir": str(tmp_path / "data"), "agent.node_name": NODE})
    config.data_path.mkdir(parents=True)
    images = config.data_path / "images" / "img-guest"
    images.mkdir(parents=True)
    for name in ("vmlinuz", "initrd.img"):
        shutil.copy(guest_image / name, images / ("kernel" if name == "vmlinuz" else "initrd"))
    store = SQLiteStore(config.data_path / "state.db")
    await store.open()
    secret_uuid = str(uuid.uuid4())
    rbd = RbdDriver(h.pool, h.conf, h.keyring, h.user, [(h.address, h.mon_port)], secret_uuid)
    storage = NodeStorage()
    storage.set_ceph_secret(
        CephSecret(uuid=secret_uuid, usage=f"minicloud-test {secret_uuid}", key=_admin_key(h.keyring), user=h.user)
    )
    storage.publish(POOL_ID, rbd)
    driver = LibvirtDriver("qemu:///system")
    r = ComputeReconciler(store=store, config=config, driver=driver, network=None, virt_type="qemu",
                          virt_reason="test", storage=storage)  # fmt: skip
    await r.start(lambda key: None)
    suffix = uuid.uuid4().hex[:8]
    data_image, vol_id = f"img-t{suffix}", f"vol-t{suffix}"
    inst_id = ""
    try:
        # the kernel image (files on this node) and an instance whose root disk is in the ceph pool
        spec = ImageSpec(boot="kernel", node=NODE, size_bytes=1, sha256="x", cmdline="panic=-1",
                         files={"kernel": ImageFileSpec(size_bytes=1, sha256="x")})  # fmt: skip
        await store.commit(Txn([Create(IMAGE.dump(IMAGE.new(project="default", name="guest", id="img-guest", spec=spec)))]))  # fmt: skip
        ispec = InstanceSpec(uuid=str(uuid.uuid4()), image_id="img-guest", image_name="guest", type="m1.tiny", vcpus=1,
                             memory_mib=192, disk_gib=1, user_data=WATCH_DISKS, node=NODE, pool=POOL_ID,
                             pool_driver="ceph")  # fmt: skip
        inst = INSTANCE.new(project="default", name="rbdguest", spec=ispec)
        inst_id = inst.id
        await store.commit(Txn([Create(INSTANCE.dump(inst))]))
        console = config.data_path / "instances" / inst.id / "console.log"

        def printed(text: str) -> bool:
            return console.exists() and text in console.read_text(errors="replace")

        async def pass_() -> None:
            await r.reconcile(inst.id)

        await _until("the guest's ready marker", lambda: printed("minicloud-guest: ready"), BOOT_TIMEOUT, pass_)
        assert await rbd.size(root_volume_name(inst.id)) == 1 << 30
        assert _secret_exists(secret_uuid)
        xml = (await driver.domain(inst.spec.uuid)).xml
        assert f"{h.pool}/{inst.id}-root" in xml and "protocol='rbd'" in xml
        await _until("the guest listing its root disk", lambda: printed("mc-head vda"), 60, pass_)

        # a volume cloned from an image's protected snapshot (what the storage reconciler makes), then attached
        src = tmp_path / "data.raw"
        src.write_bytes(MARKER.encode() + b"\0" * ((1 << 20) - len(MARKER)))
        await rbd.import_file(src, data_image)
        await rbd.snapshot(data_image, "base", protect=True)
        await rbd.clone(data_image, "base", vol_id, 1 << 30)
        att = Attachment(instance=inst.id, instance_name=inst.name, node=NODE, device="vdb")
        vspec = VolumeSpec(size_gib=1, pool=POOL_ID, driver="ceph", node=NODE, attachment=att)
        vol = VOLUME.new(project="default", name="data", id=vol_id, spec=vspec,
                         status=VolumeObserved(state="attaching", size_gib=1))  # fmt: skip
        await store.commit(Txn([Create(VOLUME.dump(vol))]))

        async def state() -> str:
            return VOLUME.load(await store.get(VOLUME.name, vol_id)).status.state

        await _until("the volume in use", _is(state, "in-use"), 60, pass_)
        await _until("the guest seeing the volume and its content", lambda: printed(f"mc-head vdb: {MARKER}"), 60)
        assert printed("mc-size vdb: 2097152")  # 1 GiB in 512-byte sectors

        # online extend (what the storage reconciler does once the volume's size grows: the data, then the status):
        # the guest's kernel sees the new size without a restart
        await rbd.resize(vol_id, 2 << 30)
        cur = VOLUME.load(await store.get(VOLUME.name, vol_id))
        grown = cur.replace(
            spec=msgspec.structs.replace(cur.spec, size_gib=2), status=msgspec.structs.replace(cur.status, size_gib=2)
        )
        await store.commit(Txn([Update(VOLUME.dump(grown), expect_revision=cur.revision)]))
        await _until("the guest seeing the grown volume", lambda: printed("mc-size vdb: 4194304"), 60, pass_)

        # detach (what the volume service writes): the guest loses the disk, the volume is available again
        cur = VOLUME.load(await store.get(VOLUME.name, vol_id))
        detached = cur.replace(
            spec=msgspec.structs.replace(cur.spec, attachment=None, detached_from=att),
            status=msgspec.structs.replace(cur.status, state="detaching"),
        )
        await store.commit(Txn([Update(VOLUME.dump(detached), expect_revision=cur.revision)]))
        await _until("the volume available", _is(state, "available"), 90, pass_)
        assert "vdb" not in (await driver.domain(inst.spec.uuid)).xml

        def unplugged() -> bool:
            lines = console.read_text(errors="replace").splitlines()
            return "vdb" not in [ln for ln in lines if ln.startswith("mc-disks:")][-1].split()

        await _until("the guest losing the disk", unplugged, 60)
        assert "target dev='vdb'" not in _live_xml(inst.spec.uuid)

        # delete: the domain, its files and its root disk go; the volume stays
        cur_inst = INSTANCE.load(await store.get(INSTANCE.name, inst.id))
        gone = cur_inst.replace(spec=msgspec.structs.replace(cur_inst.spec, deleted=True))
        await store.commit(Txn([Update(INSTANCE.dump(gone), expect_revision=cur_inst.revision)]))
        await pass_()
        assert await store.get(INSTANCE.name, inst.id) is None
        assert not await rbd.exists(root_volume_name(inst.id)) and await rbd.exists(vol_id)
        assert _domain_names(config.data_path) == []
    finally:
        for uuid_ in [d.uuid for d in await driver.domains() if str(config.data_path) in d.xml]:
            await driver.destroy(uuid_)
            await driver.undefine(uuid_)
        for name in (vol_id, root_volume_name(inst_id) if inst_id else "", data_image):
            if name:
                with contextlib.suppress(Exception):
                    await rbd.delete(name)
        await driver.undefine_secret(secret_uuid)
        await r.close()
        await store.close()
    assert not _secret_exists(secret_uuid)


def _is(read, wanted: str):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return await read() == wanted

    return check
