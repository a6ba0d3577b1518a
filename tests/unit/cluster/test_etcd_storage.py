"""etcd's growth is bounded (issue 9 §2.9): the member runs with a quota and history compaction, the storage figures
become warnings before the quota is reached, defragmentation is decided from the figures, `cluster show` shows it."""

from __future__ import annotations

from pathlib import Path

import msgspec

from agent.etcd import EtcdMemberConfig
from minicloud import config as cfgmod
from minicloud.cli import cluster as cli_cluster
from minicloud.cluster import storage
from minicloud.model import ClusterInfo, ClusterMember

GiB = 1 << 30
MiB = 1 << 20


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_etcd_runs_with_a_quota_and_history_compaction():
    cfg = EtcdMemberConfig(
        name="n1", data_dir=Path("/d"), client_url="https://10.0.0.1:2379", peer_url="https://10.0.0.1:2380",
        ca_file=Path("/ca"), cert_file=Path("/c"), key_file=Path("/k"),
    )  # fmt: skip
    cmd = cfg.command()
    assert _flag(cmd, "--quota-backend-bytes") == str(2 * GiB)
    assert _flag(cmd, "--auto-compaction-mode") == "revision"
    assert _flag(cmd, "--auto-compaction-retention") == "100000"
    cfg.quota_backend_bytes, cfg.history_revisions = 4 * GiB, 5000
    cmd = cfg.command()
    assert _flag(cmd, "--quota-backend-bytes") == str(4 * GiB) and _flag(cmd, "--auto-compaction-retention") == "5000"


def test_the_quota_is_configurable_and_bounded(tmp_path):
    empty = tmp_path / "m.toml"
    empty.write_text("")
    cfg = cfgmod.load(empty, env={}, overrides={"cluster.etcd_quota_bytes": 3 * GiB})
    assert cfg.cluster.etcd_quota_bytes == 3 * GiB
    assert cfgmod.load(empty, env={}, overrides={}).cluster.etcd_quota_bytes == 2 * GiB


def test_storage_warns_from_80_percent_and_on_alarms():
    ok = storage.assess("n1", 100 * MiB, 90 * MiB, 2 * GiB, [])
    assert ok.warning is None and ok.used_percent == 4.9
    near = storage.assess("n1", int(1.7 * GiB), int(1.6 * GiB), 2 * GiB, [])
    assert near.used_percent == 85.0 and "85%" in near.warning and "etcd_quota_bytes" in near.warning
    full = storage.assess("n2", 2 * GiB, 2 * GiB, 2 * GiB, ["NOSPACE"])
    assert full.alarms == ["NOSPACE"] and "refuses writes" in full.warning
    corrupt = storage.assess("n3", 10 * MiB, 10 * MiB, 2 * GiB, ["CORRUPT"])
    assert "CORRUPT" in corrupt.warning


def test_defragmentation_and_disarm_are_decided_from_the_figures():
    assert storage.needs_defrag(1 * GiB, 200 * MiB)  # 80 % free, 824 MiB
    assert not storage.needs_defrag(1 * GiB, 900 * MiB)  # mostly in use
    assert not storage.needs_defrag(60 * MiB, 1 * MiB)  # too small to matter
    assert not storage.needs_defrag(0, 0)
    assert storage.may_disarm(1 * GiB, 2 * GiB) and not storage.may_disarm(int(1.9 * GiB), 2 * GiB)


def test_cluster_show_prints_the_storage_and_its_warning(capsys):
    member = ClusterMember(name="n1", address="10.0.0.1", role="voter", status="online")
    info = ClusterInfo(
        enabled=True, node="n1", leader="n1", members=[member],
        storage=[storage.assess("n1", int(1.7 * GiB), int(1.6 * GiB), 2 * GiB, [])],
    )  # fmt: skip
    cli_cluster._show(info, "table")
    out = capsys.readouterr().out
    assert "etcd n1: 1.70 GiB of 2.00 GiB (85 %)" in out
    assert "WARNING: etcd on n1 uses" in out
    cli_cluster._show(
        msgspec.structs.replace(info, storage=[storage.assess("n1", 10 * MiB, 9 * MiB, 2 * GiB, [])]), "table"
    )
    assert "WARNING" not in capsys.readouterr().out
