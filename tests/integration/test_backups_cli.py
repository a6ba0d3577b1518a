"""`minicloud admin backup FILE | list | delete NAME` against a real agent: retention count, deletion, rate limit."""

from __future__ import annotations

import pytest

from tests.integration.conftest import Agent


@pytest.fixture
def node(tmp_path):
    a = Agent(tmp_path / "node")
    a.config.parent.mkdir(parents=True, exist_ok=True)
    a.config.write_text('[compute]\ndriver = "none"\n[retention]\nbackups_keep = 2\nbackup_min_interval = 0\n')
    a.start()
    yield a
    a.stop()


def test_backup_list_keeps_the_newest_and_delete_removes_one(node, tmp_path):
    made = [node.json("admin", "backup", str(tmp_path / f"b{i}.db"))["name"] for i in range(3)]
    listed = node.json("admin", "backup", "list")
    assert [b["name"] for b in listed] == [made[2], made[1]]
    table = node.cli("admin", "backup", "list", check=True).stdout
    assert table.splitlines()[0].split() == ["NAME", "SIZE", "CREATED", "NODE"] and made[2] in table
    r = node.cli("admin", "backup", "delete", made[1], check=True)
    assert f"Deleted backup {made[1]}" in r.stdout
    assert [b["name"] for b in node.json("admin", "backup", "list")] == [made[2]]
    r = node.cli("admin", "backup", "delete", made[1])
    assert r.returncode != 0 and "admin backup list" in r.stderr


def test_a_second_backup_within_the_minimum_interval_is_refused(tmp_path):
    a = Agent(tmp_path / "node")
    a.config.parent.mkdir(parents=True, exist_ok=True)
    a.config.write_text('[compute]\ndriver = "none"\n[retention]\nbackup_min_interval = 3600\n')
    a.start()
    try:
        a.cli("admin", "backup", str(tmp_path / "one.db"), check=True)
        r = a.cli("admin", "backup", str(tmp_path / "two.db"))
        assert r.returncode != 0 and "backup_min_interval" in r.stderr
        assert not (tmp_path / "two.db").exists()
    finally:
        a.stop()
