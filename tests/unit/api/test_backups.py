"""Backups: list, delete, the retention count, and admission (one at a time per node, a minimum interval)."""

from __future__ import annotations

import msgspec
import pytest

from minicloud import backups, errors
from minicloud.backups import BackupFile, BackupGate
from minicloud.cli.admin import backup_command
from minicloud.cli.main import build_parser
from tests.unit.api.conftest import make_config, start_api


async def problem(resp, status):
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/problem+json"
    return await resp.json()


def config(tmp_path, **retention):
    cfg = make_config(tmp_path)
    return msgspec.structs.replace(cfg, retention=msgspec.structs.replace(cfg.retention, **retention))


@pytest.fixture
async def api(tmp_path):
    a = await start_api(config(tmp_path, backups_keep=2, backup_min_interval=0))
    yield a
    await a.client.close()


async def make_backup(api) -> dict:
    resp = await api.post("/v1/admin/backups")
    assert resp.status == 202, await resp.text()
    op = await resp.json()
    done = await (await api.get(f"/v1/operations/{op['id']}?wait=30")).json()
    assert done["state"] == "succeeded", done
    return done["result"]


async def test_backups_are_listed_newest_first_and_only_the_newest_are_kept(api):
    assert (await (await api.get("/v1/admin/backups")).json())["items"] == []
    made = [await make_backup(api) for _ in range(3)]
    assert made[2]["pruned"] == [made[0]["name"]]
    listed = (await (await api.get("/v1/admin/backups")).json())["items"]
    assert [b["name"] for b in listed] == [made[2]["name"], made[1]["name"]]
    assert listed[0]["node"] == "n1" and listed[0]["size_bytes"] == made[2]["size_bytes"]
    await problem(await api.get(f"/v1/admin/backups/{made[0]['name']}"), 404)


async def test_a_backup_can_be_deleted(api):
    name = (await make_backup(api))["name"]
    assert (await api.delete(f"/v1/admin/backups/{name}")).status == 204
    assert (await (await api.get("/v1/admin/backups")).json())["items"] == []
    p = await problem(await api.delete(f"/v1/admin/backups/{name}"), 404)
    assert "admin backup list" in p["detail"]
    await problem(await api.delete("/v1/admin/backups/state.db"), 404)
    await problem(await api.delete("/v1/admin/backups/..%2Fstate.db"), 404)


async def test_backup_list_and_delete_need_the_admin_role(api):
    await problem(await api.get("/v1/admin/backups", anon=True), 401)
    await problem(await api.delete("/v1/admin/backups/backup-20260101T000000-0123abcd.db", anon=True), 401)


async def test_a_second_backup_within_the_minimum_interval_is_refused_with_retry_after(tmp_path):
    a = await start_api(config(tmp_path, backup_min_interval=3600))
    try:
        await make_backup(a)
        resp = await a.post("/v1/admin/backups")
        p = await problem(resp, 429)
        assert int(resp.headers["Retry-After"]) > 3500 and "backup_min_interval" in p["detail"]
        assert len((await (await a.get("/v1/admin/backups")).json())["items"]) == 1
    finally:
        await a.client.close()


async def test_a_retried_backup_request_replays_its_first_answer_despite_the_minimum_interval(tmp_path):
    a = await start_api(config(tmp_path, backup_min_interval=3600))
    try:
        first = await a.post("/v1/admin/backups", headers={"Idempotency-Key": "nightly-1"})
        assert first.status == 202
        op = await first.json()
        await a.get(f"/v1/operations/{op['id']}?wait=30")
        again = await a.post("/v1/admin/backups", headers={"Idempotency-Key": "nightly-1"})
        assert again.status == 202 and (await again.json())["id"] == op["id"]
        assert again.headers.get("Idempotent-Replayed") == "true"
        await problem(await a.post("/v1/admin/backups", headers={"Idempotency-Key": "nightly-2"}), 429)
    finally:
        await a.client.close()


# -- admission and retention, pure ---------------------------------------------------------------------------------


def test_the_gate_admits_one_backup_at_a_time():
    gate = BackupGate()
    gate.admit("op-1", now=100.0, min_interval=0)
    with pytest.raises(errors.Conflict) as exc:
        gate.admit("op-2", now=101.0, min_interval=0)
    assert "op-1" in str(exc.value) and "minicloud operation wait op-1" in str(exc.value)
    gate.release("op-1")
    gate.admit("op-2", now=102.0, min_interval=0)


def test_the_gate_enforces_the_minimum_interval_and_forgets_a_backup_that_never_started():
    gate = BackupGate()
    gate.admit("op-1", now=100.0, min_interval=60)
    gate.release("op-1")
    with pytest.raises(errors.TooManyRequests) as exc:
        gate.admit("op-2", now=130.0, min_interval=60)
    assert exc.value.headers["Retry-After"] == "30"
    previous = gate.admit("op-3", now=160.0, min_interval=60)
    gate.release("op-3", restore=previous, started=False)  # e.g. an idempotent replay: nothing was started
    assert gate.running is None and gate.last_start == 100.0  # the next interval is measured from op-1 again
    gate.admit("op-4", now=161.0, min_interval=60)


def test_to_prune_keeps_the_newest_by_start_time_then_write_time():
    files = [
        BackupFile("backup-20260101T000000-ffffffff.db", 1, "", mtime_ns=1),
        BackupFile("backup-20260101T000000-00000000.db", 1, "", mtime_ns=2),
        BackupFile("backup-20260102T000000-aaaaaaaa.db", 1, "", mtime_ns=0),
        BackupFile("backup-20251231T235959-bbbbbbbb.db", 1, "", mtime_ns=9),
    ]
    assert backups.to_prune(files, 2) == ["backup-20260101T000000-ffffffff.db", "backup-20251231T235959-bbbbbbbb.db"]
    assert backups.to_prune(files, 10) == []


# -- the command line ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [["admin", "backup", "list"], ["admin", "backup", "delete", "backup-x.db"], ["admin", "backup", "/tmp/f.db"]],
)
def test_admin_backup_verbs_parse(argv):
    args = build_parser().parse_args(argv)
    assert args.func is backup_command and args.words == argv[2:]


@pytest.mark.parametrize("words", [["delete"], ["delete", "a", "b"], ["a", "b"]])
def test_admin_backup_misuse_says_how(words):
    from minicloud.cli.common import CommandError

    args = build_parser().parse_args(["admin", "backup", *words])
    with pytest.raises(CommandError) as exc:
        backup_command(args)
    assert "usage: minicloud admin backup" in str(exc.value)


async def test_a_backup_into_a_bucket_the_project_lacks_is_refused_before_anything_is_made(api):
    p = await problem(await api.post("/v1/admin/backups?bucket=nosuch"), 404)
    assert "minicloud bucket create nosuch" in p["detail"]
    await problem(await api.post("/v1/admin/backups?bucket=Bad_Name"), 422)
    p = await problem(await api.post("/v1/admin/backups?target=elsewhere"), 422)
    assert "bucket" in p["detail"]
    await problem(await api.post("/v1/admin/backups?bucket=bk1&target=nosuch"), 404)
    await problem(await api.get("/v1/admin/backups?bucket=nosuch"), 404)
    assert (await (await api.get("/v1/admin/backups")).json())["items"] == []
    await make_backup(api)  # the refusals did not hold the node's backup slot


def test_the_bucket_cli_lines_parse():
    parser = build_parser()
    args = parser.parse_args(["admin", "backup", "--bucket", "b1", "--target", "site2"])
    assert args.words == [] and args.bucket == "b1" and args.target == "site2"
    args = parser.parse_args(["admin", "backup", "list", "--bucket", "b1"])
    assert args.words == ["list"] and args.bucket == "b1"
    for words in (["admin", "backup"], ["admin", "backup", "--target", "site2"]):
        with pytest.raises(Exception, match=r"usage|needs --bucket"):
            backup_command(parser.parse_args(words))
