from __future__ import annotations

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from agent.node import attach_node_services
from minicloud import config as cfgmod
from minicloud.api.app import create_app
from minicloud.api.keys import STORE
from minicloud.iam import apikeys
from minicloud.state import Create, Txn


class FakeHost:
    """Host facts stand-in: the API unit tests don't depend on the machine (the real HostFacts is exercised by the
    integration tests through `minicloud node show`)."""

    def node(self):
        from minicloud.model import Node, Virtualization

        return Node(
            name="n1", hostname="h", kernel="k", os="os", arch="x86_64", cpu_count=2, cpu_model="cpu",
            memory_total_bytes=1, memory_available_bytes=1, load_average=[0.0, 0.0, 0.0], boot_time="t", disks=[],
            virtualization=Virtualization(kvm_device=False, hardware_virt=False, virt_type="qemu", reason="test"),
            version="0",
        )  # fmt: skip


def make_config(tmp_path, **api):
    """A config for a node in ``tmp_path`` that ignores /etc/minicloud and the environment."""
    empty = tmp_path / "minicloud.toml"
    empty.write_text("")
    cfg = cfgmod.load(
        empty,
        env={},
        overrides={
            "agent.data_dir": str(tmp_path / "data"),
            "agent.socket": str(tmp_path / "s.sock"),
            "agent.listen": "127.0.0.1:0",
            "agent.node_name": "n1",
            # The fake hypervisor and network: the API's compute paths run, nothing touches the host.
            "compute.driver": "fake",
        },
    )
    if api:
        cfg = msgspec.structs.replace(cfg, api=msgspec.structs.replace(cfg.api, **api))
    return cfg


class Api:
    """An aiohttp test client with a valid admin bearer token; ``anon`` sends no credentials."""

    def __init__(self, client: TestClient, token: str) -> None:
        self.client = client
        self.token = token
        self.app = client.server.app

    def _headers(self, headers, anon):
        h = dict(headers or {})
        if not anon:
            h.setdefault("Authorization", f"Bearer {self.token}")
        return h

    async def request(self, method, path, *, anon=False, headers=None, **kw):
        return await self.client.request(method, path, headers=self._headers(headers, anon), **kw)

    async def get(self, path, **kw):
        return await self.request("GET", path, **kw)

    async def post(self, path, **kw):
        return await self.request("POST", path, **kw)

    async def patch(self, path, **kw):
        return await self.request("PATCH", path, **kw)

    async def delete(self, path, **kw):
        return await self.request("DELETE", path, **kw)

    async def ws(self, path, anon=False):
        return await self.client.ws_connect(path, headers=self._headers(None, anon))


async def start_api(cfg, extra_routes=()):
    app = attach_node_services(create_app(cfg, host=FakeHost()))  # the fake hypervisor and network
    for table in extra_routes:
        table.register(app)
    client = TestClient(TestServer(app))
    await client.start_server()
    record, token = apikeys.new_key("default", "test-admin", "", None, {}, principal="user:usr-admin")
    # The key acts as the `admin` user, whom the agent bootstraps with the cluster-wide admin role.
    await app[STORE].commit(Txn([Create(record)]))
    return Api(client, token)


@pytest.fixture
async def api(tmp_path):
    a = await start_api(make_config(tmp_path))
    yield a
    await a.client.close()
