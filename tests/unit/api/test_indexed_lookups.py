"""Request paths look records up through an index, never by listing a whole kind (issue 9 §2.9): placing an
instance reads only its node's instances, deleting an image only the instances that use it, and the node's
reconciler only its own instances and images."""

from __future__ import annotations

import asyncio

from minicloud.api.keys import STORE
from tests.unit.api.test_compute_api import _image, _wait_state


async def test_instance_and_image_paths_list_only_through_indexed_lookups(api):
    store = api.app[STORE]
    real_list = store.list
    scans: list[tuple[str, dict]] = []

    async def spy(kind, **kw):
        if kind in ("instance", "image") and not kw.get("where") and kw.get("name") is None:
            scans.append((kind, kw))
        return await real_list(kind, **kw)

    store.list = spy
    await _image(api)
    for name in ("vm1", "vm2"):
        resp = await api.post("/v1/instances", json={"name": name, "image": "guest", "type": "m1.tiny"})
        assert resp.status == 201, await resp.text()
    await _wait_state(api, "vm2", "running")
    refused = await api.delete("/v1/images/guest")
    assert refused.status == 409 and "2 instance(s)" in (await refused.json())["detail"]
    await asyncio.sleep(0.1)  # let the reconciler make another pass
    # Listing instances or images through the API pages over the kind, which is what the caller asked for.
    assert (await api.get("/v1/instances")).status == 200
    scans = [s for s in scans if s[1].get("limit", 0) > 1000 or s[1].get("project", "") is None]
    assert scans == [], scans
