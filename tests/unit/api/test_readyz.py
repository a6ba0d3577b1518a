"""/readyz follows the store's writer: a node whose writer died is not ready (issue 9 §2.7 b)."""

from __future__ import annotations

import asyncio

from minicloud.api.keys import STORE
from minicloud.state import Create, Txn
from tests.unit.api.conftest import make_config, start_api
from tests.unit.state.test_write_path import rec


async def test_readyz_is_503_once_the_store_writer_is_dead(tmp_path):
    api = await start_api(make_config(tmp_path))
    try:
        assert (await api.get("/readyz", anon=True)).status == 200
        store = api.app[STORE]
        store.add_commit_hook(lambda changes: 1 / 0)  # a broken hook is survived ...
        async with asyncio.timeout(5):
            await store.commit(Txn([Create(rec("a"))]))
        assert (await api.get("/readyz", anon=True)).status == 200
        store.local._writer.cancel()  # ... a writer that dies is not
        await asyncio.sleep(0)
        resp = await api.get("/readyz", anon=True)
        body = await resp.json()
        assert resp.status == 503 and body["checks"]["store_writer"].startswith("stopped"), body
    finally:
        await api.client.close()
