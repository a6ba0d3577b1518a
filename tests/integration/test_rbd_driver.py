"""The ``ceph`` volume driver against a real Ceph cluster (the run's ``ceph_cluster``): RBD images through the ``rbd``
and ``qemu-img`` tools. Every test uses its own image names, since the cluster is shared by the whole run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.storage.driver import InUse, NotFound, StorageError
from agent.storage.rbd import FEATURES, RbdDriver

MiB = 1 << 20


@pytest.fixture
def drv(ceph_cluster) -> RbdDriver:  # type: ignore[no-untyped-def]
    h = ceph_cluster
    return RbdDriver(
        pool=h.pool,
        conf=h.conf,
        keyring=h.keyring,
        user=h.user,
        hosts=[(h.address, h.mon_port)],
        secret_uuid=str(uuid.uuid4()),
    )


@pytest.fixture
def names(drv: RbdDriver) -> Iterator[callable]:  # type: ignore[valid-type]
    """``names("vol")`` → a unique image name; every image named is deleted afterwards (clones first)."""
    made: list[str] = []

    def make(prefix: str) -> str:
        made.append(f"{prefix}-{uuid.uuid4().hex[:10]}")
        return made[-1]

    yield make
    for name in reversed(made):
        _rbd(drv, "rm", "--no-progress", f"{drv.pool}/{name}", check=False)
    for name in made:  # parents after their clones
        _rbd(drv, "snap", "purge", "--no-progress", f"{drv.pool}/{name}", check=False)
        _rbd(drv, "rm", "--no-progress", f"{drv.pool}/{name}", check=False)


def _rbd(drv: RbdDriver, *args: str, check: bool = True) -> str:
    argv = ["rbd", "--conf", str(drv.conf), "--id", drv.user, "--keyring", str(drv.keyring), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _info(drv: RbdDriver, vol: str) -> dict:
    return json.loads(_rbd(drv, "info", "--format", "json", f"{drv.pool}/{vol}"))


def _target(drv: RbdDriver, vol: str) -> str:
    return f"rbd:{drv.pool}/{vol}:id={drv.user}:conf={drv.conf}:keyring={drv.keyring}"


def qemu_io(target: str, *commands: str, fmt: str = "raw") -> str:
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    return subprocess.run([*argv, target], check=True, capture_output=True, text=True, timeout=60).stdout


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, timeout=60)


def open_in_background(target: str) -> subprocess.Popen[str]:
    """A ``qemu-io`` holding ``target`` open (a watcher, standing for a running guest), once it has it open."""
    holder = subprocess.Popen(
        ["qemu-io", "-f", "raw", target], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdin is not None and holder.stdout is not None
    holder.stdin.write("read 0 512\n")
    holder.stdin.flush()
    holder.stdout.readline()  # the image is open once the read is answered
    return holder


def close(holder: subprocess.Popen[str]) -> None:
    """End the holder cleanly (a killed client's RBD watch would linger until the OSDs time it out, 30 s)."""
    assert holder.stdin is not None
    holder.stdin.close()
    try:
        holder.wait(timeout=30)
    except subprocess.TimeoutExpired:
        holder.kill()
        holder.wait()


def holds(target: str, byte: int, offset: int = 0, length: int = 64 * 1024) -> bool:
    return "Pattern verification failed" not in qemu_io(target, f"read -P {byte} {offset} {length}")


async def test_create_resize_and_delete_are_idempotent(drv: RbdDriver, names) -> None:  # type: ignore[no-untyped-def]
    vol = names("vol")
    await drv.create(vol, 64 * MiB)
    await drv.create(vol, 64 * MiB)
    assert await drv.exists(vol) and await drv.size(vol) == 64 * MiB
    assert vol in await drv.list()
    assert set(_info(drv, vol)["features"]) == set(FEATURES.split(","))
    with pytest.raises(StorageError, match="already exists"):
        await drv.create(vol, 128 * MiB)
    await drv.resize(vol, 128 * MiB)
    await drv.resize(vol, 128 * MiB)
    assert await drv.size(vol) == 128 * MiB
    with pytest.raises(StorageError, match="only grow"):
        await drv.resize(vol, 64 * MiB)
    await drv.delete(vol)
    await drv.delete(vol)
    assert not await drv.exists(vol) and await drv.size(vol) is None
    with pytest.raises(NotFound):
        await drv.resize(vol, 64 * MiB)


async def test_import_qcow2_as_a_thin_raw_image(drv: RbdDriver, names, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io is missing (qemu-utils)")
    src = tmp_path / "img.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), "256M")
    qemu_io(str(src), "write -P 0x5a 0 1M", "write -P 0x33 200M 64k", fmt="qcow2")
    img = names("img")
    assert await drv.import_file(src, img) == 256 * MiB
    assert await drv.import_file(src, img) == 256 * MiB  # done already
    assert not any(n.endswith(".part") for n in json.loads(_rbd(drv, "ls", "--format", "json", drv.pool)))
    assert set(_info(drv, img)["features"]) == set(FEATURES.split(","))
    target = _target(drv, img)
    assert holds(target, 0x5A, 0, MiB) and holds(target, 0x33, 200 * MiB) and holds(target, 0, 100 * MiB)
    du = json.loads(_rbd(drv, "du", "--format", "json", f"{drv.pool}/{img}"))
    assert du["images"][0]["used_size"] <= 8 * MiB  # only the written objects (4 MiB each), not 256 MiB

    bad = tmp_path / "overlay.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(src), str(bad))
    refused = names("img")
    with pytest.raises(StorageError, match="overlay"):
        await drv.import_file(bad, refused)
    assert not await drv.exists(refused)


async def test_image_base_clone_children_and_in_use(drv: RbdDriver, names) -> None:  # type: ignore[no-untyped-def]
    img, root, other = names("img"), names("i-root"), names("vol")
    await drv.create(img, 64 * MiB)
    qemu_io(_target(drv, img), "write -P 0x11 0 64k")
    await drv.snapshot(img, "base", protect=True)
    await drv.snapshot(img, "base", protect=True)
    assert await drv.snapshots(img) == ["base"]

    await drv.clone(img, "base", root, 1024 * MiB)
    await drv.clone(img, "base", root, 1024 * MiB)  # idempotent
    info = _info(drv, root)
    assert info["parent"]["image"] == img and info["parent"]["snapshot"] == "base"
    assert info["size"] == 1024 * MiB and set(info["features"]) == set(FEATURES.split(","))
    assert holds(_target(drv, root), 0x11)
    assert await drv.children(img, "base") == [root]
    assert await drv.children(img, "missing") == []

    with pytest.raises(InUse, match=root):
        await drv.delete_snapshot(img, "base")
    with pytest.raises(InUse, match=root):
        await drv.delete(img)
    await drv.create(other, 64 * MiB)
    with pytest.raises(StorageError, match="not a clone"):
        await drv.clone(img, "base", other, 64 * MiB)
    with pytest.raises(NotFound):
        await drv.clone(img, "nope", names("vol"), 64 * MiB)

    await drv.flatten(root)
    await drv.flatten(root)
    assert not _info(drv, root).get("parent")
    assert holds(_target(drv, root), 0x11)
    assert await drv.children(img, "base") == []
    await drv.delete(img)  # unprotects and removes base
    assert not await drv.exists(img)


async def test_clone_of_an_unprotected_snapshot_protects_it(drv: RbdDriver, names) -> None:  # type: ignore[no-untyped-def]
    vol, copy = names("vol"), names("vol")
    await drv.create(vol, 64 * MiB)
    await drv.snapshot(vol, "snap-1")
    await drv.clone(vol, "snap-1", copy, 64 * MiB)
    assert await drv.children(vol, "snap-1") == [copy]
    await drv.delete(copy)
    await drv.delete_snapshot(vol, "snap-1")  # unprotects it first
    await drv.delete_snapshot(vol, "snap-1")
    assert await drv.snapshots(vol) == []


async def test_snapshot_rollback_and_the_open_image(drv: RbdDriver, names) -> None:  # type: ignore[no-untyped-def]
    vol = names("vol")
    await drv.create(vol, 64 * MiB)
    target = _target(drv, vol)
    qemu_io(target, "write -P 0x11 0 64k")
    await drv.snapshot(vol, "snap-1")
    await drv.snapshot(vol, "snap-2", protect=True)
    qemu_io(target, "write -P 0x22 0 64k")
    await drv.rollback(vol, "snap-1")
    assert holds(target, 0x11)
    with pytest.raises(NotFound):
        await drv.rollback(vol, "snap-9")

    holder = open_in_background(target)
    try:
        with pytest.raises(InUse, match="open by a client"):
            await drv.rollback(vol, "snap-1")
        with pytest.raises(InUse, match="open by a client"):
            await drv.delete(vol)
        await drv.snapshot(vol, "snap-3")  # snapshots of an open image are fine (crash-consistent)
    finally:
        close(holder)
    assert await drv.snapshots(vol) == ["snap-1", "snap-2", "snap-3"]
    await drv.delete(vol)  # with its snapshots, snap-2 protected
    assert not await drv.exists(vol)


async def test_errors_are_plain_words_without_the_key(drv: RbdDriver, names) -> None:  # type: ignore[no-untyped-def]
    key = re.search(r"key\s*=\s*(\S+)", drv.keyring.read_text())
    assert key is not None
    missing = RbdDriver("no-such-pool", drv.conf, drv.keyring, drv.user, drv.hosts, drv.secret_uuid, timeout=30)
    with pytest.raises(StorageError) as err:
        await missing.create(names("vol"), MiB)
    assert "creating volume" in str(err.value) and key.group(1) not in str(err.value)
