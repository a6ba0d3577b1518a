"""``minicloud admin backup|restore``: copies of the whole state."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sqlite3
from pathlib import Path

from minicloud.cli.common import CommandError, client, wait_operation
from minicloud.cli.output import col, emit
from minicloud.model import Operation, Page
from minicloud.model.backups import Backup


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("admin", help="administration: backups")
    verbs = p.add_subparsers(dest="verb", metavar="<verb>", required=True)
    v = verbs.add_parser(
        "backup",
        help="back up the whole state to FILE and/or --bucket B (an operation on the node); `backup list`, "
        "`backup delete NAME`",
        description="`admin backup FILE` makes a backup on the node and downloads it to FILE; `admin backup --bucket "
        "B [--target T]` uploads it into bucket B of the project (or of backup target T) as "
        "minicloud-backups/state/NAME; `admin backup list [--bucket B]` lists the backups kept on the node (the "
        "newest retention.backups_keep) or in the bucket; `admin backup delete NAME` deletes one from the node. A "
        "file called list or delete is written with a path: ./list.",
    )
    v.add_argument("words", nargs="*", metavar="FILE | list | delete NAME")
    v.add_argument("--bucket", help="also upload the backup into this bucket of the project (list: list it)")
    v.add_argument("--target", help="a backup target (`minicloud backup-target list`) holding the bucket")
    v.set_defaults(func=backup_command)
    v = verbs.add_parser("restore", help="restore a backup into a stopped node's data directory")
    v.add_argument("file")
    v.add_argument("--data-dir", default=os.environ.get("MINICLOUD_DATA_DIR", "/var/lib/minicloud"))
    v.set_defaults(func=restore)


BACKUP_COLUMNS = [col("name", "name"), col("size", "size_bytes"), col("created", "created_at"), col("node", "node")]


def backup_command(args: argparse.Namespace) -> int:
    """``admin backup FILE | list | delete NAME``."""
    words = args.words
    if args.target and not args.bucket:
        raise CommandError("--target needs --bucket: the bucket of that endpoint the backups are in", 2)
    if not words:
        if not args.bucket:
            raise CommandError("usage: minicloud admin backup FILE | --bucket B | list | delete NAME", 2)
        args.file = None
        return backup(args)
    if words == ["list"]:
        return backup_list(args)
    if words[0] == "delete":
        if len(words) != 2:
            raise CommandError("usage: minicloud admin backup delete NAME (names: minicloud admin backup list)", 2)
        return backup_delete(args, words[1])
    if len(words) != 1:
        raise CommandError("usage: minicloud admin backup FILE | list | delete NAME", 2)
    args.file = words[0]
    return backup(args)


def _bucket_query(args: argparse.Namespace) -> dict[str, str] | None:
    return {"bucket": args.bucket, "target": args.target} if args.bucket else None


def backup_list(args: argparse.Namespace) -> int:
    page = client(args).call("GET", "/v1/admin/backups", Page[Backup], query=_bucket_query(args))
    columns = BACKUP_COLUMNS if not args.bucket else [*BACKUP_COLUMNS[:3], col("bucket", "bucket")]
    emit(page.items, args.output, columns)
    return 0


def backup_delete(args: argparse.Namespace, name: str) -> int:
    client(args).call("DELETE", f"/v1/admin/backups/{name}")
    if args.output == "table":
        print(f"Deleted backup {name}")
    return 0


def backup(args: argparse.Namespace) -> int:
    c = client(args)
    op = c.call("POST", "/v1/admin/backups", Operation, query=_bucket_query(args))
    final = wait_operation(c, op, args.output)
    result = final.result or {}
    if args.file is None:  # into the bucket only
        if args.output == "table":
            print(
                f"Backed up revision {result['revision']} to s3://{result['bucket']}/{result['object']} "
                f"({result['size_bytes']} bytes, sha256 {result['sha256']})"
            )
        else:
            emit(result, args.output)
        return 0
    resp = c.raw("GET", f"/v1/admin/backups/{result['name']}")
    if resp.status != 200:
        raise CommandError(f"could not download the backup (HTTP {resp.status})")
    target = Path(args.file)
    tmp = target.with_name(target.name + ".part")
    tmp.write_bytes(resp.body)
    os.replace(tmp, target)
    if args.output == "table":
        print(
            f"Backed up revision {result['revision']} to {target} ({len(resp.body)} bytes, sha256 {result['sha256']})"
        )
        if result.get("bucket"):
            print(f"Uploaded to s3://{result['bucket']}/{result['object']}")
    else:
        emit({**result, "file": str(target)}, args.output)
    return 0


def _check_backup(path: Path) -> int:
    try:
        from minicloud.state.migrations import SCHEMA_VERSION
    except ImportError:
        raise CommandError(
            "admin restore runs on the node and needs the agent's packages: pip install 'minicloud[agent]'"
        ) from None

    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            (ok,) = db.execute("PRAGMA integrity_check").fetchone()
            (version,) = db.execute("PRAGMA user_version").fetchone()
            (revision,) = db.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()
        finally:
            db.close()
    except sqlite3.DatabaseError as exc:
        raise CommandError(f"{path} is not a minicloud backup: {exc}") from None
    if ok != "ok":
        raise CommandError(f"{path} is damaged: {ok}")
    if version > SCHEMA_VERSION:
        raise CommandError(f"{path} comes from a newer minicloud (schema {version}); upgrade first")
    return int(revision)


def restore(args: argparse.Namespace) -> int:
    src = Path(args.file)
    data = Path(args.data_dir)
    state_file = data / "agent.json"
    if state_file.exists():
        try:
            pid = json.loads(state_file.read_text())["pid"]
            os.kill(pid, 0)
            raise CommandError(f"the agent (pid {pid}) is running on {data}; stop it first (systemctl stop minicloud)")
        except (ProcessLookupError, KeyError, ValueError):
            pass
    revision = _check_backup(src)
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    current = data / "state.db"
    if current.exists():
        keep = data / f"state.db.before-restore-{_dt.datetime.now(_dt.UTC):%Y%m%dT%H%M%S}"
        shutil.move(current, keep)
        for suffix in ("-wal", "-shm"):
            Path(str(current) + suffix).unlink(missing_ok=True)
        print(f"Kept the previous state as {keep}")
    shutil.copyfile(src, current)
    os.chmod(current, 0o600)
    # A restored node starts alone: its copy may come from a cluster, whose etcd membership it must not rejoin
    # with older state. `minicloud cluster enable` makes it a cluster again; the other nodes then re-join.
    db = sqlite3.connect(current)
    with db:
        db.execute("DELETE FROM meta WHERE key LIKE 'x.etcd_%'")
    db.close()
    stamp = f"{_dt.datetime.now(_dt.UTC):%Y%m%dT%H%M%S}"
    clustered = False
    for name in ("cluster.json", "etcd", "etcd.pid"):
        old = data / name
        if old.exists():
            clustered = True
            shutil.move(old, data / f"{name}.before-restore-{stamp}")
    print(f"Restored revision {revision} into {current}; start the agent again.")
    if clustered:
        print("This node was in a cluster: it now starts alone. Run `minicloud cluster enable` on it, then")
        print(
            "`minicloud cluster add NODE` + `minicloud join TOKEN` for each other node (with fresh data directories)."
        )
    return 0
