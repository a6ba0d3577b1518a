"""The TSDB the agent runs (``agent/tsdb.py``): a real agent starts VictoriaMetrics, which scrapes the agent's
``/metrics`` over HTTPS with the metrics token; the TSDB refuses callers without its password; a killed TSDB is
restarted; an orphan left by an earlier agent is replaced; stopping the agent stops it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from agent.daemon import serve
from agent.tsdb import Tsdb, TsdbConfig, TsdbSupervisor
from tests.unit.api.conftest import make_config

DEADLINE = 60.0  # generous: conditions below are polled until true, never timed


async def _eventually(check, what: str):
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while True:
        value = await check()
        if value:
            return value
        assert loop.time() < end, f"never happened: {what}"
        await asyncio.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


async def test_the_agent_runs_a_tsdb_that_scrapes_its_own_metrics(tmp_path):
    import msgspec

    cfg = make_config(tmp_path)
    cfg = msgspec.structs.replace(cfg, metrics=msgspec.structs.replace(cfg.metrics, tsdb="on", scrape_interval=1.0))
    stop = asyncio.Event()
    task = asyncio.create_task(serve(cfg, stop))
    sock = cfg.agent.socket
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=sock)) as http:

            async def query(promql: str):
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.get(
                        "http://agent/v1/metrics/query", params={"query": promql, "scope": "cluster"}
                    ) as r:
                        if r.status == 200:
                            return (await r.json())["result"]
                return None

            up = await _eventually(lambda: query('up{job="minicloud"} == 1'), "the agent scraped (up == 1)")
            assert up[0]["metric"]["instance"].startswith("127.0.0.1:")
            series = await _eventually(
                lambda: query('minicloud_api_requests_total{route="/v1/metrics/query"}'), "API requests counted"
            )
            assert series[0]["metric"]["node"] == "n1"
            node = await _eventually(lambda: query("minicloud_node_memory_total_bytes"), "node figures")
            assert float(node[0]["value"][1]) > 0
        pid = _check_the_running_tsdb(cfg.data_path / "metrics")
    finally:
        stop.set()
        await task
    assert not _alive(pid)


def _check_the_running_tsdb(base: Path) -> int:
    """The token file is private, the password is not on the command line, and the TSDB refuses a caller without
    it. Returns the TSDB's pid."""
    assert (base / "token").stat().st_mode & 0o077 == 0
    pid = int((base / "tsdb.pid").read_text())
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert not any(a.lower().startswith(b"-httpauth.password") for a in argv)
    port = next(a for a in argv if a.startswith(b"-httpListenAddr=")).split(b":")[-1].decode()
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?query=up", timeout=5)
    assert info.value.code == 401
    return pid


@pytest.fixture
def tsdb_config(tmp_path):
    return TsdbConfig(data_dir=tmp_path / "metrics" / "tsdb", scrape_interval=1.0)


async def test_the_supervisor_restarts_a_tsdb_that_died_and_keeps_targets_current(tsdb_config):
    targets = ["10.0.0.1:8443"]

    async def listing():
        return list(targets)

    tsdb = Tsdb(tsdb_config)
    supervisor = TsdbSupervisor(tsdb, listing, interval=0.2)
    await supervisor.start()
    try:
        await tsdb.wait_ready()
        assert "10.0.0.1:8443" in tsdb_config.scrape_file.read_text()
        first = tsdb.proc.pid
        os.kill(first, signal.SIGKILL)

        async def restarted():
            return tsdb.running and tsdb.proc.pid != first

        await _eventually(restarted, "the TSDB restarted")
        await tsdb.wait_ready()
        targets.append("10.0.0.2:8443")

        async def rewritten():
            return "10.0.0.2:8443" in tsdb_config.scrape_file.read_text()

        await _eventually(rewritten, "the scrape configuration follows the targets")
        assert supervisor.restarts >= 1
    finally:
        await supervisor.close()
    assert not tsdb.running


async def test_a_new_ca_or_token_restarts_the_tsdb_and_a_new_target_only_reloads_it(tmp_path):
    """A node that joins a cluster gets a new CA and a new metrics token: a reload left the TSDB failing to scrape
    its own agent with what it had read at start, so the supervisor restarts it then (and only then)."""
    from minicloud.pki import create_ca

    ca, token = tmp_path / "ca.crt", tmp_path / "token"
    own_ca, cluster_ca = create_ca("own")[0], create_ca("cluster")[0]  # (certificate, key) each
    ca.write_bytes(own_ca)
    token.write_text("own-token\n")
    config = TsdbConfig(data_dir=tmp_path / "metrics" / "tsdb", scrape_interval=1.0, ca_file=ca, token_file=token)
    targets = ["10.0.0.1:8443"]

    async def listing():
        return list(targets)

    tsdb = Tsdb(config)
    supervisor = TsdbSupervisor(tsdb, listing, interval=0.2)
    await supervisor.start()
    try:
        await tsdb.wait_ready()
        first = tsdb.proc.pid
        targets.append("10.0.0.2:8443")  # a new target: reloaded in place
        await _eventually(
            lambda: asyncio.sleep(0, "10.0.0.2:8443" in config.scrape_file.read_text()), "the new target written"
        )
        await asyncio.sleep(1.0)  # five passes of the loop
        assert tsdb.proc.pid == first
        for changed, content in ((ca, cluster_ca), (token, b"cluster-token\n")):  # each a restart
            before = tsdb.proc.pid
            changed.write_bytes(content)

            async def restarted(before=before):
                return tsdb.running and tsdb.proc.pid != before and tsdb.spawned_with == tsdb.credentials()

            await _eventually(restarted, f"the TSDB restarted after {changed.name} changed")
            await tsdb.wait_ready()
        assert supervisor.restarts == 0  # restarts counts processes that died, not these
    finally:
        await supervisor.close()
    assert not tsdb.running


async def test_an_orphan_tsdb_is_replaced_by_the_next_start(tsdb_config):
    old = Tsdb(tsdb_config)
    await old.start()
    orphan = old.proc.pid
    new = Tsdb(tsdb_config)
    try:
        await new.start()
        assert not _alive(orphan)
        assert new.proc.pid != orphan
    finally:
        await new.stop()
        await old.stop()


async def test_ceph_mgrs_are_scraped_where_the_cluster_runs_ceph(tmp_path):
    """The MGRs' exporters (beside the MONs of the cephcluster record, on storage.ceph_prometheus_port) become a
    ``ceph`` job that follows no redirects (a standby is up 0, not a copy of the active); VictoriaMetrics accepts
    the document; no Ceph, no job."""
    import subprocess

    import yaml
    from aiohttp import web

    from agent.metrics.serve import ceph_targets
    from minicloud import ids
    from minicloud.api.keys import CONFIG, STORE
    from minicloud.state import Create, Txn
    from minicloud.state.handle import StoreHandle
    from minicloud.state.sqlite import SQLiteStore
    from minicloud.storage.kinds import CEPH, CEPH_NAME, CephSpec

    app = web.Application()
    app[CONFIG] = make_config(tmp_path)
    app[STORE] = store = StoreHandle(SQLiteStore(tmp_path / "state.db"))
    await store.open()
    try:
        assert await ceph_targets(app) == []
        spec = CephSpec(fsid="f", bootstrap_node="n1", mons={"n1": "10.0.0.1", "n2": "10.0.0.2:3300", "n3": "fd00::3"})
        record = CEPH.new(project="", name=CEPH_NAME, spec=spec, labels={}, stamp=ids.now())
        await store.commit(Txn([Create(CEPH.dump(record))]))
        ceph = await ceph_targets(app)
        assert ceph == ["10.0.0.1:9283", "10.0.0.2:9283", "[fd00::3]:9283"]
    finally:
        await store.close()
    config = TsdbConfig(data_dir=tmp_path / "metrics" / "tsdb")
    doc = config.scrape_config(["10.0.0.1:8443"], ceph)
    job = next(j for j in doc["scrape_configs"] if j["job_name"] == "ceph")  # type: ignore[attr-defined]
    assert job["scheme"] == "http" and job["follow_redirects"] is False
    assert job["static_configs"] == [{"targets": ceph}]
    assert [j["job_name"] for j in config.scrape_config(["10.0.0.1:8443"])["scrape_configs"]] == ["minicloud"]  # type: ignore[index]
    path = tmp_path / "scrape.yml"
    path.write_text(yaml.safe_dump(doc))
    out = await asyncio.to_thread(
        subprocess.run,
        ["victoria-metrics", f"-promscrape.config={path}", "-promscrape.config.dryRun", "-loggerLevel=ERROR"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_scrape_configuration_names_a_copy_of_the_ca_by_its_content_so_a_new_ca_is_a_reloaded_change(tmp_path):
    """A node that joins a cluster gets the cluster's CA at the path of its own: with that path in the configuration
    the TSDB kept the CA it had read at start and could not verify its own agent's new certificate (up == 0)."""
    import yaml

    ca = tmp_path / "ca.crt"
    config = TsdbConfig(data_dir=tmp_path / "metrics" / "tsdb", ca_file=ca)
    tsdb = Tsdb(config)
    assert tsdb.write_scrape_config(["10.0.0.1:8443"])  # no CA yet: its path
    assert yaml.safe_load(config.scrape_file.read_text())["scrape_configs"][0]["tls_config"] == {"ca_file": str(ca)}
    for content in ("own", "cluster"):
        ca.write_text(f"-----BEGIN CERTIFICATE-----\n{content}\n-----END CERTIFICATE-----\n")
        assert tsdb.write_scrape_config(["10.0.0.1:8443"])  # a change: the supervisor reloads (SIGHUP)
        assert not tsdb.write_scrape_config(["10.0.0.1:8443"])  # and only once
        named = Path(yaml.safe_load(config.scrape_file.read_text())["scrape_configs"][0]["tls_config"]["ca_file"])
        assert named.read_text() == ca.read_text() and named != ca
        assert list(config.base.glob("ca-*.crt")) == [named]  # the previous copy is gone
