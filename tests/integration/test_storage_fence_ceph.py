"""The fence of a lost node against the run's real Ceph cluster: Ceph takes the reconciler's ten-year expiry (the
entry is listed until then), and lifting a fence twice — a node that crashed after ``blocklist rm`` and before
recording it — is not an error."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from agent.reconcilers.storage import FENCE_SECONDS
from tests import ceph
from tests.ceph import CephHandle

pytestmark = pytest.mark.skipif(not ceph.ceph_installed(), reason=ceph.SKIP_REASON)


async def test_a_fence_lasts_ten_years_and_lifting_it_twice_is_fine(ceph_cluster: CephHandle) -> None:
    engine = ceph_cluster.engine()
    addr = "192.0.2.77"  # TEST-NET: no client of the shared cluster lives there
    await engine.blocklist_add(addr, expire_seconds=FENCE_SECONDS)
    try:
        out = await engine.ceph("osd", "blocklist", "ls")
        if isinstance(out, str):
            out = json.JSONDecoder().raw_decode(out)[0]
        until = next(e["until"] for e in out if e["addr"] == f"{addr}:0/0")
        expires = dt.datetime.fromisoformat(until.split(".")[0].replace("T", " ").rstrip("Z"))
        assert expires.year >= dt.datetime.now().year + 9, until
    finally:
        await engine.blocklist_rm(addr)
    assert f"{addr}:0/0" not in await engine.blocklist_ls()
    await engine.blocklist_rm(addr)  # lifted already
