"""The ``gpu`` records: a node's publication (new, changed, gone, held, vfio-bound), the API and CLI for
administrators (``gpu list|show``; members get 403), and the node's discovery wired in end to end with a fake
sysfs tree (NVML is absent on this machine, as on most nodes)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web

from agent.gpu.inventory import GpuFound, Inventory, summary
from agent.node import attach_node_services
from minicloud.api.app import create_app
from minicloud.api.keys import HOST, STORE
from minicloud.cli.main import main
from minicloud.config import GpuConfig
from minicloud.gpu import service
from minicloud.gpu.kinds import GPU, GpuSpec, gpu_id
from minicloud.state import SQLiteStore
from tests.unit.api.conftest import FakeHost, make_config, start_api
from tests.unit.api.test_network_api import _member, _ok, _problem
from tests.unit.gpu.fakes import FakeSysfs


def spec(pci: str = "0000:3b:00.0", **kw: Any) -> GpuSpec:
    base = dict(node="n1", pci_address=pci, pci_id="10de:2330", model="H100 80GB HBM3", capable=True)
    return GpuSpec(**{**base, **kw})


@pytest.fixture
async def store(tmp_path):
    s = SQLiteStore(tmp_path / "state.db", retain_changes=1000)
    await s.open()
    yield s
    await s.close()


async def test_publish_creates_changes_and_removes_records_keeping_the_holder(store):
    assert await service.publish(store, "n1", [spec(), spec("0000:af:00.0")])
    assert not await service.publish(store, "n1", [spec(), spec("0000:af:00.0")])  # idempotent
    gpus = await service.node_gpus(store, "n1")
    assert sorted(g.name for g in gpus) == ["n1:0000:3b:00.0", "n1:0000:af:00.0"]
    assert all(g.labels == {"node": "n1"} for g in gpus)
    # an instance holds one (placement's compare-and-swap)
    held = next(g for g in gpus if g.spec.pci_address == "0000:3b:00.0")
    from minicloud.state import Txn

    await store.commit(Txn(service.claim_ops([held], "i-1", "vm", "t")))
    # the node's next publication changes a fact: the holder stays
    assert await service.publish(store, "n1", [spec(driver="vfio-pci"), spec("0000:af:00.0")])
    (again,) = await service.held_by(store, "n1", "i-1")
    assert (again.spec.driver, again.spec.instance, again.spec.instance_name) == ("vfio-pci", "i-1", "vm")
    # both vanish: the free one's record goes, the held one stays, marked not present, until released
    assert await service.publish(store, "n1", [])
    (left,) = await service.node_gpus(store, "n1")
    assert (left.id, left.spec.present, left.spec.instance) == (gpu_id("n1", "0000:3b:00.0"), False, "i-1")
    await store.commit(Txn(await service.release_ops(store, "n1", "i-1")))
    assert await service.node_gpus(store, "n1") == []


async def test_a_gpu_moved_to_vfio_keeps_what_nvml_said_of_it(store):
    await service.publish(store, "n1", [spec(uuid="GPU-a", memory_mib=81559, source="nvml", driver="nvidia")])
    bare = spec(model="GH100 [H100 SXM5 80GB]", source="sysfs", driver="vfio-pci")
    await service.publish(store, "n1", [bare])
    (g,) = await service.node_gpus(store, "n1")
    assert (g.spec.model, g.spec.uuid, g.spec.memory_mib, g.spec.driver, g.spec.source) == (
        "H100 80GB HBM3", "GPU-a", 81559, "vfio-pci", "sysfs",
    )  # fmt: skip
    # another card in that slot (another PCI id) is taken as sysfs says
    await service.publish(store, "n1", [spec(pci_id="10de:20b0", model="GA100", source="sysfs")])
    (g,) = await service.node_gpus(store, "n1")
    assert (g.spec.model, g.spec.uuid) == ("GA100", "")


def test_node_summary() -> None:
    inv = Inventory(
        node="n1",
        gpus=(
            GpuFound(spec=spec(driver_version="550.54.15")),
            GpuFound(spec=spec("0000:af:00.0", capable=False)),
        ),
        nvml_reason="",
    )
    s = summary(inv)
    assert (s.count, s.capable, s.models, s.reason, s.driver_version) == (
        2, 1, ["2 x H100 80GB HBM3"], "", "550.54.15",
    )  # fmt: skip
    none = summary(Inventory(node="n1", gpus=(), nvml_reason="libnvidia-ml.so.1 is not installed"))
    assert none.count == 0 and none.reason.startswith("no NVIDIA GPU on this node")


async def _wait_for(predicate: Any, what: str) -> None:
    for _ in range(500):
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never: {what}")


async def test_the_node_publishes_its_gpus_and_administrators_read_them(tmp_path):
    fs = FakeSysfs(tmp_path / "sys")
    fs.add("0000:3b:00.0", driver="vfio-pci", group="7")
    fs.add("0000:3b:00.1", device="0x22a3", cls="0x040300", driver="vfio-pci", group="7")
    fs.add("0000:5e:00.0", device="0x27b8", group="9")
    fs.add("0000:5f:00.0", vendor="0x8086", device="0x1234", cls="0x020000", driver="e1000e", group="9")
    cfg = make_config(tmp_path)
    cfg = msgspec.structs.replace(cfg, gpu=GpuConfig(sysfs_root=str(fs.root)))
    api = await start_api(cfg)
    try:
        store = api.app[STORE]

        async def published() -> bool:
            return len(await service.node_gpus(store, cfg.node_name)) == 2

        await _wait_for(published, "the node's GPUs published")
        listed = (await _ok(await api.get("/v1/gpus")))["items"]
        assert [g["pci_address"] for g in listed] == ["0000:3b:00.0", "0000:5e:00.0"]
        ok, shared = listed
        assert (ok["capable"], ok["functions"], ok["driver"], ok["source"]) == (
            True, ["0000:3b:00.0", "0000:3b:00.1"], "vfio-pci", "sysfs",
        )  # fmt: skip
        assert not shared["capable"] and "0000:5f:00.0" in shared["reason"]
        shown = await _ok(await api.get(f"/v1/gpus/{ok['name']}"))
        assert shown["id"] == ok["id"] == gpu_id(cfg.node_name, "0000:3b:00.0")
        by_node = (await _ok(await api.get(f"/v1/gpus?label=node={cfg.node_name}")))["items"]
        assert len(by_node) == 2
        member = await _member(api)
        await _problem(await api.client.get("/v1/gpus?project=p1", headers=member), 403)
        await _problem(await api.client.get(f"/v1/gpus/{ok['id']}?project=p1", headers=member), 403)
    finally:
        await api.client.close()


async def test_gpu_list_and_show_through_the_cli(tmp_path):
    app = create_app(make_config(tmp_path), host=FakeHost())
    runner = web.AppRunner(app)
    await runner.setup()
    sock = str(tmp_path / "api.sock")
    await web.UnixSite(runner, sock).start()
    try:
        await service.publish(app[STORE], "n7", [spec(node="n7")])

        def cli(*argv: str) -> Any:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert main(["--socket", sock, *argv]) == 0
            return out.getvalue()

        table = await asyncio.to_thread(cli, "gpu", "list")
        assert "n7:0000:3b:00.0" in table and "H100 80GB HBM3" in table
        shown = json.loads(await asyncio.to_thread(cli, "-o", "json", "gpu", "show", "n7:0000:3b:00.0"))
        assert (shown["node"], shown["capable"], shown["instance"]) == ("n7", True, "")
    finally:
        await runner.cleanup()


def test_gpu_record_id_is_stable_per_node_and_address() -> None:
    assert gpu_id("n1", "0000:3b:00.0") == gpu_id("n1", "0000:3b:00.0") != gpu_id("n2", "0000:3b:00.0")
    assert GPU.scope == "cluster" and GPU.actions("list") == "admin:gpus:list"
    assert isinstance(Path, type)


async def _node_show(tmp_path: Path, fs: FakeSysfs) -> tuple[dict[str, Any], str]:
    """``GET /v1/node`` through ``minicloud node show`` on a node whose sysfs is ``fs``: the JSON and the table."""
    cfg = msgspec.structs.replace(make_config(tmp_path), gpu=GpuConfig(sysfs_root=str(fs.root)))
    app = attach_node_services(create_app(cfg))
    runner = web.AppRunner(app)
    await runner.setup()
    sock = str(tmp_path / "api.sock")
    await web.UnixSite(runner, sock).start()
    try:

        async def summarised() -> bool:
            return app[HOST].node().gpus is not None

        await _wait_for(summarised, "the node's GPU summary")

        def cli(*argv: str) -> str:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert main(["--socket", sock, *argv]) == 0
            return out.getvalue()

        shown = json.loads(await asyncio.to_thread(cli, "-o", "json", "node", "show"))
        return shown, await asyncio.to_thread(cli, "node", "show")
    finally:
        await runner.cleanup()


async def test_node_show_summarises_the_gpus_the_node_found(tmp_path):
    """``GET /v1/node`` (and ``minicloud node show``) with the node's real host facts and a fake sysfs tree."""
    fs = FakeSysfs(tmp_path / "sys")
    fs.add("0000:3b:00.0", driver="vfio-pci", group="7")
    fs.add("0000:5e:00.0", group="9")
    shown, table = await _node_show(tmp_path, fs)
    assert shown["gpus"]["count"] == 2 and shown["gpus"]["capable"] == 2
    assert len(shown["gpus"]["models"]) == 1 and shown["gpus"]["models"][0].startswith("2 x ")
    assert "gpus:        2 x " in table and "(2 of 2 passthrough-capable)" in table


async def test_node_show_says_why_a_node_has_no_gpus(tmp_path):
    """A node whose only PCI device is a NIC: ``node show`` prints ``gpus: none (<reason>)``, the reason the API gives."""
    fs = FakeSysfs(tmp_path / "sys")
    fs.add("0000:5f:00.0", vendor="0x8086", device="0x1234", cls="0x020000", driver="e1000e", group="9")
    shown, table = await _node_show(tmp_path, fs)
    assert (shown["gpus"]["count"], shown["gpus"]["capable"], shown["gpus"]["models"]) == (0, 0, [])
    reason = shown["gpus"]["reason"]
    assert reason.startswith("no NVIDIA GPU on this node (no PCI device of vendor 0x10de, class 0x03xx in ")
    (line,) = [ln for ln in table.splitlines() if ln.startswith("gpus:")]
    assert line == f"gpus:        none ({reason})"
    assert "passthrough-capable" not in table
