"""The Ceph engine's pure parts: the ceph.conf it writes, keyrings, the disk checks before an OSD, and Ceph's JSON
(captured from a real Pacific cluster in ceph_json/) turned into status in plain words."""

from __future__ import annotations

import copy
import json
import stat
from pathlib import Path

import pytest

from agent.storage.ceph import (
    CephEngine,
    CephError,
    CephKeys,
    CephSettings,
    check_block_device,
    crush_counts,
    crush_rule,
    keyring_text,
    render_conf,
)
from agent.storage.ceph_status import (
    CephStatus,
    MonInfo,
    OsdInfo,
    lost_nodes_words,
    parse_mons,
    parse_osds,
    status_from_json,
)

GOLDEN = Path(__file__).parent / "ceph_json"


def load(name: str):
    return json.loads((GOLDEN / f"{name}.json").read_text())


def settings(root: str = "/var/lib/minicloud/ceph", **kw) -> CephSettings:
    return CephSettings(
        root=Path(root),
        fsid="0b5c7e3e-8f65-4d0e-9c43-1f1f5a1f7a11",
        node="n1",
        address="10.0.0.1",
        mon_hosts={"n1": "10.0.0.1", "n0": "10.0.0.9"},
        **kw,
    )


EXPECTED_CONF = """\
# Written by the minicloud agent; changes are overwritten.
[global]
fsid = 0b5c7e3e-8f65-4d0e-9c43-1f1f5a1f7a11
mon_host = [v2:10.0.0.9:3300,v1:10.0.0.9:6789],[v2:10.0.0.1:3300,v1:10.0.0.1:6789]
public_addr = 10.0.0.1
cluster_addr = 10.0.0.1
ms_bind_ipv4 = true
ms_bind_ipv6 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
paxos_propose_interval = 0.05
osd_pool_default_pg_autoscale_mode = off
mon_data_avail_warn = 10
mon_allow_pool_delete = true
mon_allow_pool_size_one = true
mon_osd_down_out_interval = 60
mon_warn_on_pool_no_redundancy = false
osd_crush_chooseleaf_type = 0
mgr_initial_modules = prometheus
run_dir = /var/lib/minicloud/ceph/run
crash_dir = /var/lib/minicloud/ceph/crash
log_file = /var/lib/minicloud/ceph/log/$name.log
mon_cluster_log_file = /var/lib/minicloud/ceph/log/$cluster.$channel.log
keyring = /var/lib/minicloud/ceph/$name.keyring

[mon]
mon_data = /var/lib/minicloud/ceph/mon/$cluster-$id
keyring = /var/lib/minicloud/ceph/mon/$cluster-$id/keyring
pid_file = /var/lib/minicloud/ceph/run/$name.pid
admin_socket = /var/lib/minicloud/ceph/run/$name.asok

[mgr]
mgr_data = /var/lib/minicloud/ceph/mgr/$cluster-$id
keyring = /var/lib/minicloud/ceph/mgr/$cluster-$id/keyring
pid_file = /var/lib/minicloud/ceph/run/$name.pid
admin_socket = /var/lib/minicloud/ceph/run/$name.asok

[osd]
osd_data = /var/lib/minicloud/ceph/osd/$id
keyring = /var/lib/minicloud/ceph/osd/$id/keyring
pid_file = /var/lib/minicloud/ceph/run/$name.pid
admin_socket = /var/lib/minicloud/ceph/run/$name.asok
osd_objectstore = bluestore
bluestore_block_create = true
osd_memory_target = 1073741824
crush_location = root=default host=n1
"""


def test_conf_names_every_mon_and_binds_the_node_address_only() -> None:
    assert render_conf(settings()) == EXPECTED_CONF


def test_conf_without_mon_hosts_names_this_node_as_the_mon() -> None:
    s = settings(mon_port=13300, mon_port_v1=16789)
    s.mon_hosts = {}
    assert "mon_host = [v2:10.0.0.1:13300,v1:10.0.0.1:16789]\n" in render_conf(s)


def test_a_node_in_a_zone_puts_its_crush_host_under_that_zone() -> None:
    s = settings()
    s.zone = "rack-a"
    assert "crush_location = root=default zone=rack-a host=n1\n" in render_conf(s)


def _tree(zones: dict[str, list[str]], loose: list[str] = (), empty: list[str] = ()) -> dict:  # type: ignore[assignment]
    """``ceph osd tree``'s JSON: hosts (one OSD each) under zones, hosts under the root, hosts without OSDs."""
    nodes, next_id = [], [-1]

    def bucket(kind: str, name: str, children: list[int]) -> int:
        next_id[0] -= 1
        nodes.append({"id": next_id[0], "name": name, "type": kind, "children": children})
        return next_id[0]

    osd = iter(range(100))
    roots = []
    for zone, hosts in zones.items():
        roots.append(bucket("zone", zone, [bucket("host", h, [next(osd)]) for h in hosts]))
    roots += [bucket("host", h, [next(osd)]) for h in loose] + [bucket("host", h, []) for h in empty]
    nodes.append({"id": -1, "name": "default", "type": "root", "children": roots})
    return {"nodes": nodes}


def test_copies_go_to_distinct_zones_when_every_host_is_in_one_and_there_are_enough() -> None:
    three_zones = crush_counts(_tree({"a": ["n1"], "b": ["n2"], "c": ["n3", "n4"]}))
    assert three_zones == (4, 3, 0)
    assert crush_rule(*three_zones, 3) == ("mc-zone", "zone")
    # two zones cannot hold three copies apart: hosts then
    two_zones = crush_counts(_tree({"a": ["n1", "n2"], "b": ["n3"]}))
    assert crush_rule(*two_zones, 3) == ("mc-host", "host") and crush_rule(*two_zones, 2) == ("mc-zone", "zone")
    # a host outside every zone would never get a copy under a zone rule
    mixed = crush_counts(_tree({"a": ["n1"], "b": ["n2"]}, loose=["n3"]))
    assert mixed == (3, 2, 1) and crush_rule(*mixed, 2) == ("mc-host", "host")
    # one zone is no failure domain; hosts without OSDs do not count
    assert crush_rule(*crush_counts(_tree({"a": ["n1", "n2"]}, empty=["n3"])), 2) == ("mc-host", "host")
    assert crush_rule(*crush_counts(_tree({}, loose=["n1"])), 1) == ("mc-osd", "osd")
    assert crush_counts(None) == (0, 0, 0)


def test_admin_sockets_move_to_a_short_directory_when_root_is_long() -> None:
    short = settings()
    assert short.socket_dir == Path("/var/lib/minicloud/ceph/run")
    long = settings("/tmp/pytest-of-root/pytest-1234/popen-gw7/test_something_long_0/" + "x" * 40 + "/ceph")
    assert str(long.socket_dir).startswith("/run/mcceph-") and len(long.socket_dir.name) == len("mcceph-") + 8
    assert f"admin_socket = {long.socket_dir}/$name.asok" in render_conf(long)
    assert len(f"{long.socket_dir}/client.bootstrap-osd.asok") <= 107
    assert settings(str(long.root)).socket_dir == long.socket_dir  # stable for one root
    assert settings(str(long.root) + "2").socket_dir != long.socket_dir


def test_keys_map_to_entities_and_back() -> None:
    keys = CephKeys(mon="a", admin="b", bootstrap_osd="c")
    assert keys.entities() == {"mon.": "a", "client.admin": "b", "client.bootstrap-osd": "c"}
    assert CephKeys.from_entities(keys.entities()) == keys
    with pytest.raises(CephError, match=r"no key for client\.admin"):
        CephKeys.from_entities({"mon.": "a"})


def test_keyring_text_is_cephs_format() -> None:
    assert keyring_text("client.admin", "KEY==", {"mon": "allow *"}) == (
        '[client.admin]\n\tkey = KEY==\n\tcaps mon = "allow *"\n'
    )


async def test_a_failed_command_reports_its_stderr_but_not_its_input() -> None:
    engine = CephEngine(settings())
    with pytest.raises(CephError) as info:
        await engine._run("sh", "-c", "cat >/dev/null; echo 'Error EINVAL: bad pool' >&2; exit 22", input=b"SECRETKEY")
    assert "exit 22" in str(info.value) and "Error EINVAL: bad pool" in str(info.value)
    assert "SECRETKEY" not in str(info.value)
    with pytest.raises(CephError, match="did not finish in 1 s"):
        await engine._run("sleep", "10", timeout=1)
    with pytest.raises(CephError, match="not installed"):
        await engine._run("/nonexistent/ceph-mon")


# -- disks for OSDs ------------------------------------------------------------------------------------------------


def _blk(_path: str) -> int:
    return stat.S_IFBLK | 0o660


def _sys_block(tmp_path: Path, name: str, *, partitions: int = 0, partition: bool = False, holders=()) -> Path:
    dev = tmp_path / "sys" / name
    (dev / "holders").mkdir(parents=True)
    if partition:
        (dev / "partition").write_text("1\n")
    for i in range(1, partitions + 1):
        (dev / f"{name}{i}").mkdir()
        (dev / f"{name}{i}" / "partition").write_text(f"{i}\n")
    for h in holders:
        (dev / "holders" / h).touch()
    return tmp_path / "sys"


def test_a_whole_unused_disk_is_accepted(tmp_path: Path) -> None:
    sys_block = _sys_block(tmp_path, "vdz")
    assert check_block_device("/dev/vdz", mounts="", sys_block=sys_block, mode_of=_blk) == "/dev/vdz"


@pytest.mark.parametrize(
    ("kw", "mounts", "message"),
    [
        ({"partitions": 2}, "", "has partitions; wipe it first"),
        ({"partition": True}, "", "is a partition; give the whole disk"),
        ({"holders": ["dm-0"]}, "", "in use by dm-0"),
        ({}, "/dev/vdz /srv ext4 rw 0 0\n", "is mounted on /srv"),
    ],
)
def test_a_disk_in_use_is_refused(tmp_path: Path, kw: dict, mounts: str, message: str) -> None:
    sys_block = _sys_block(tmp_path, "vdz", **kw)
    with pytest.raises(CephError, match=message):
        check_block_device("/dev/vdz", mounts=mounts, sys_block=sys_block, mode_of=_blk)


def test_what_is_not_a_block_device_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "disk.img"
    f.write_bytes(b"")
    with pytest.raises(CephError, match="is not a block device"):
        check_block_device(str(f), mounts="")
    with pytest.raises(CephError, match="No such file"):
        check_block_device(str(tmp_path / "missing"), mounts="")


# -- status ----------------------------------------------------------------------------------------------------------


def test_osds_are_read_with_their_host_state_and_size() -> None:
    osds = parse_osds(load("osd_df_tree_osd_down"))
    assert [(o.id, o.node, o.up, o.in_, o.size_bytes) for o in osds] == [
        (0, "n1", True, True, 3 << 30),
        (1, "n1", True, True, 3 << 30),
        (2, "n1", False, True, 3 << 30),
    ]
    assert all(0 < o.used_bytes < o.size_bytes for o in osds)


def test_osds_on_two_hosts_and_out_ones() -> None:
    tree = copy.deepcopy(load("osd_df_tree"))
    host = next(n for n in tree["nodes"] if n["type"] == "host")
    host["children"].remove(2)
    tree["nodes"].append({**host, "id": -5, "name": "n2", "children": [2]})
    next(n for n in tree["nodes"] if n.get("id") == 1)["reweight"] = 0
    osds = parse_osds(tree)
    assert [(o.id, o.node, o.in_) for o in osds] == [(0, "n1", True), (1, "n1", False), (2, "n2", True)]


def test_mons_with_their_v2_address_and_quorum() -> None:
    assert [(m.name, m.address, m.in_quorum) for m in parse_mons(load("mon_dump"))] == [("n1", "127.0.0.1:23300", True)]


def test_a_clean_cluster_is_ready_and_says_so() -> None:
    st = status_from_json(load("status_clean"), load("osd_df_tree"), load("mon_dump"), load("pool_ls"))
    assert st.ready and st.health == "HEALTH_OK" and st.mgr_available
    assert st.summary == (
        "Healthy: 3 OSDs on 1 node, 9.0 GiB of which 3.5 GiB used; all 33 placement groups active+clean."
    )
    assert st.pgs == {"active+clean": 33}
    assert st.capacity_bytes == 9 << 30 and st.used_bytes + st.available_bytes == st.capacity_bytes


def test_a_new_pool_the_mgr_has_not_reported_is_not_ready() -> None:
    """HEALTH_OK and every reported PG clean, but the new pool's 32 PGs are not counted yet."""
    st = status_from_json(load("status_new_pool"), load("osd_df_tree"), load("mon_dump"), load("pool_ls"))
    assert st.health == "HEALTH_OK" and not st.ready
    assert st.summary == "32 placement groups of new pools are being created."


def test_a_down_osd_is_named_with_its_node_and_what_to_do() -> None:
    st = status_from_json(load("status_osd_down"), load("osd_df_tree_osd_down"), load("mon_dump"), load("pool_ls"))
    assert st.health == "HEALTH_WARN" and not st.ready
    assert st.summary == (
        "1 of 3 OSDs is down (osd.2 on node n1): its daemon is not running; the agent restarts it, or run "
        "`minicloud storage disk list`; 16 of 33 placement groups have fewer copies than asked: data is served but "
        "less safe until recovery finishes (it runs by itself once the disks are up)."
    )
    assert st.pgs == {"active+clean": 17, "active+undersized+degraded": 16}
    assert set(st.checks) == {"OSD_DOWN", "PG_DEGRADED"}


def test_without_the_mgr_figures_are_stale_and_not_ready() -> None:
    st = status_from_json(load("status_mgr_down"), load("osd_df_tree"), load("mon_dump"), load("pool_ls"))
    assert not st.ready and not st.mgr_available
    assert st.summary.startswith("The manager (ceph-mgr) is not running")


def test_a_mon_out_of_quorum_and_single_copy_pools_and_full_disks() -> None:
    mons = copy.deepcopy(load("mon_dump"))
    first = mons["mons"][0]
    mons["mons"] += [
        {**first, "rank": 1, "name": "n2", "public_addrs": {"addrvec": [{"type": "v2", "addr": "10.0.0.2:3300"}]}},
        {**first, "rank": 2, "name": "n3", "public_addrs": {"addrvec": [{"type": "v2", "addr": "10.0.0.3:3300"}]}},
    ]
    mons["quorum"] = [0, 1]
    status = copy.deepcopy(load("status_clean"))
    status["health"] = {
        "status": "HEALTH_WARN",
        "checks": {
            "MON_DOWN": {"severity": "HEALTH_WARN", "summary": {"message": "1/3 mons down"}},
            "OSD_NEARFULL": {"severity": "HEALTH_WARN", "summary": {"message": "1 nearfull osd(s)"}},
            "RECENT_CRASH": {"severity": "HEALTH_WARN", "summary": {"message": "1 daemons have recently crashed"}},
        },
    }
    pools = copy.deepcopy(load("pool_ls"))
    for p in pools:
        p["size"] = 1
    st = status_from_json(status, load("osd_df_tree"), mons, pools)
    assert not st.ready
    assert st.summary == (
        "1 of 3 monitors is out of quorum (n3 at 10.0.0.3:3300): its daemon is not running or cannot reach the "
        "others; the agent on that node restarts it; disks are nearly full (38 % used): writes stop when they are "
        "full; add a disk with `minicloud storage disk add` or delete volumes and snapshots; pools "
        "device_health_metrics, mc-tests keep one copy: a lost disk loses data; 1 daemons have recently crashed "
        "(RECENT_CRASH)."
    )


def test_no_osds_says_to_add_a_disk() -> None:
    status = copy.deepcopy(load("status_clean"))
    status["pgmap"] = {"pgs_by_state": [], "num_pgs": 0, "num_pools": 0}
    tree = {"nodes": [n for n in load("osd_df_tree")["nodes"] if n["type"] != "osd"], "stray": []}
    st = status_from_json(status, tree, load("mon_dump"), [])
    assert not st.ready and st.osds == []
    assert "There are no disks (OSDs): add one with `minicloud storage disk add`" in st.summary


def _lost_status(*, quorum: tuple[str, ...], osd3_in: bool = True) -> CephStatus:
    return CephStatus(
        health="HEALTH_WARN",
        summary="",
        ready=False,
        mons=[MonInfo(name=n, address="", in_quorum=n in quorum) for n in ("n1", "n2", "n3")],
        osds=[
            OsdInfo(id=0, node="n1", up=True, in_=True),
            OsdInfo(id=1, node="n2", up=True, in_=True),
            OsdInfo(id=2, node="n3", up=False, in_=osd3_in),
        ],
    )


def test_a_lost_node_is_named_with_what_ceph_does_about_it() -> None:
    st = _lost_status(quorum=("n1", "n2"))
    assert lost_nodes_words(st, {"n3"}, 60) == (
        "node n3 is lost (offline): its monitor is out of quorum (2 of 3 monitors keep the quorum); osd.2 is down; "
        "Ceph marks it out 60 s after it went down and copies the data to the other nodes; when it is gone for good, "
        "remove it (`minicloud cluster remove n3`), or start it again"
    )
    out = lost_nodes_words(_lost_status(quorum=("n1", "n2"), osd3_in=False), {"n3"}, 60)
    assert "osd.2 is down and out: its data is copied elsewhere" in out


def test_losing_two_of_three_monitors_says_there_is_no_quorum() -> None:
    out = lost_nodes_words(_lost_status(quorum=("n1",)), {"n2", "n3"}, 60)
    assert "only 1 of 3 monitors are left: no quorum" in out and "node n2 is lost" in out


def test_nodes_without_ceph_daemons_or_none_lost_say_nothing() -> None:
    st = _lost_status(quorum=("n1", "n2", "n3"))
    assert lost_nodes_words(st, set(), 60) == "" and lost_nodes_words(st, {"n9"}, 60) == ""


async def test_a_cancelled_command_kills_its_process(tmp_path):
    """An agent stopping (or a leader's loop cancelled) must not leave a `ceph` command behind on dead MONs."""
    import asyncio
    import os
    import sys

    from agent.storage.ceph import CephEngine, CephSettings

    engine = CephEngine(CephSettings(root=tmp_path / "ceph", fsid="f", node="n1", address="127.0.0.1"))
    pidfile = tmp_path / "pid"
    code = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(30)"
    task = asyncio.create_task(engine._run(sys.executable, "-c", code, timeout=60))
    for _ in range(250):
        if pidfile.exists() and pidfile.read_text():
            break
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ProcessLookupError):
        os.kill(int(pidfile.read_text()), 0)
