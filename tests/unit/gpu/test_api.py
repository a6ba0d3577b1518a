"""GPU types and instances over HTTP (the API with the node's services and the fake hypervisor): the type's GPU
fields and their validation (422), 409 problems naming what is missing, the GPU held and shown in ``gpu list``,
resize of a running GPU instance refused, and the GPU free again once the node tore the instance down."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from minicloud.api.keys import CONFIG, STORE
from minicloud.config import GpuConfig
from minicloud.gpu import service
from minicloud.gpu.kinds import GpuSpec
from tests.unit.api.conftest import make_config, start_api
from tests.unit.api.test_compute_api import _image
from tests.unit.api.test_network_api import _ok, _problem


@pytest.fixture
async def api(tmp_path):
    """The API with the node's services, its own GPU discovery off: the test publishes the node's GPUs itself (the
    node would otherwise replace them with what this machine has: none)."""
    a = await start_api(msgspec.structs.replace(make_config(tmp_path), gpu=GpuConfig(enabled=False)))
    yield a
    await a.client.close()


TYPE = {"name": "g1.large", "vcpus": 1, "memory_mib": 128, "disk_gib": 1, "gpus": 1, "gpu_model": "H100*"}


async def test_gpu_types_and_instances_over_http(api):
    t = await _ok(await api.post("/v1/instance-types", json=TYPE), 201)
    assert (t["gpus"], t["gpu_model"]) == (1, "H100*")
    assert (await _ok(await api.get("/v1/instance-types/g1.large")))["gpus"] == 1
    for bad in ({"gpus": 17}, {"gpus": -1}, {"gpu_model": "H100;rm"}, {"gpu_model": "x" * 65}, {"gpus": 0}):
        await _problem(await api.post("/v1/instance-types", json={**TYPE, "name": "bad", **bad}), 422)
    await _image(api)
    node = api.app[CONFIG].node_name
    p = await _problem(await api.post("/v1/instances", json={"name": "vm", "image": "guest", "type": "g1.large"}), 409)
    assert f"{node}: 1 free passthrough-capable GPU matching 'H100*' wanted, the node has no GPU" in p["detail"]
    store = api.app[STORE]
    spec = GpuSpec(node=node, pci_address="0000:3b:00.0", pci_id="10de:2330", model="H100 80GB HBM3", capable=True)
    await service.publish(store, node, [spec])
    vm = await _ok(await api.post("/v1/instances", json={"name": "vm", "image": "guest", "type": "g1.large"}), 201)
    assert vm["gpus"] == 1
    (g,) = (await _ok(await api.get("/v1/gpus")))["items"]
    assert (g["instance"], g["instance_name"]) == (vm["id"], "vm")
    p = await _problem(await api.post("/v1/instances", json={"name": "vm2", "image": "guest", "type": "g1.large"}), 409)
    assert "0000:3b:00.0 held by instance vm" in p["detail"]
    p = await _problem(await api.post("/v1/instances/vm/resize", json={"type": "g1.large"}), 409)
    assert "has GPUs passed through" in p["detail"] and "stop it first" in p["detail"]
    await _ok(await api.delete("/v1/instances/vm"), 202)
    for _ in range(500):  # the node tears it down, then removes the record and frees the GPU in one transaction
        (g,) = await service.node_gpus(store, node)
        if not g.spec.instance:
            break
        await asyncio.sleep(0.02)
    assert g.spec.instance == "" and (await api.get("/v1/instances/vm")).status == 404


async def test_the_type_create_line_of_the_issue_through_the_real_cli(tmp_path):
    """``minicloud type create g1.large --vcpus 8 --memory 32768 --disk 40 --gpus 1 --gpu-model "H100*"``, exactly as
    issue #15 writes it, through the CLI parser, the SDK and the API on a Unix socket."""
    import contextlib
    import io
    import json
    import shlex

    from aiohttp import web

    from minicloud.api.app import create_app
    from minicloud.cli.main import main

    config = msgspec.structs.replace(make_config(tmp_path), gpu=GpuConfig(enabled=False))
    runner = web.AppRunner(create_app(config))
    await runner.setup()
    sock = str(tmp_path / "api.sock")
    await web.UnixSite(runner, sock).start()
    line = 'minicloud type create g1.large --vcpus 8 --memory 32768 --disk 40 --gpus 1 --gpu-model "H100*"'

    def cli() -> dict:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["--socket", sock, "-o", "json", *shlex.split(line)[1:]]) == 0
        return json.loads(out.getvalue())

    try:
        made = await asyncio.to_thread(cli)
    finally:
        await runner.cleanup()
    assert (made["name"], made["vcpus"], made["memory_mib"], made["disk_gib"]) == ("g1.large", 8, 32768, 40)
    assert (made["gpus"], made["gpu_model"]) == (1, "H100*")
