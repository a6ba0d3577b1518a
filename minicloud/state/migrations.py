"""Numbered schema migrations. ``MIGRATIONS[n]`` upgrades a database at ``user_version`` n to n + 1.

Each runs in its own transaction together with the ``user_version`` bump, so a crash mid-migration leaves the old
schema intact. Never edit a released migration; append a new one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable


def update_from_v0(db: sqlite3.Connection) -> None:
    """Records, the change log and the store revision."""
    db.execute(
        """CREATE TABLE records (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            project TEXT NOT NULL,
            name TEXT NOT NULL,
            labels TEXT NOT NULL,
            spec TEXT NOT NULL,
            status TEXT NOT NULL,
            revision INTEGER NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            UNIQUE (kind, project, name)
        ) STRICT"""
    )
    db.execute("CREATE INDEX records_kind_name ON records (kind, name, id)")
    db.execute(
        """CREATE TABLE changes (
            revision INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            type TEXT NOT NULL,
            kind TEXT NOT NULL,
            id TEXT NOT NULL,
            project TEXT NOT NULL,
            record TEXT NOT NULL,
            PRIMARY KEY (revision, seq)
        ) STRICT, WITHOUT ROWID"""
    )
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) STRICT, WITHOUT ROWID")
    db.execute("INSERT INTO meta (key, value) VALUES ('revision', 0), ('compacted', 0)")


#: Top-level spec fields with an expression index: ``Store.list(kind, where={field: value})`` accepts only these.
INDEXED_SPEC_FIELDS = frozenset({"node", "image_id"})


def update_from_v1(db: sqlite3.Connection) -> None:
    """Expression indexes for the lookups request paths make: instances by node (placement, each node's
    reconciler) and by image (refusing to delete an image in use). Partial: only records that have the field.
    A query uses them when it says exactly ``json_extract(spec, '$.node') = ?`` (see ``sqlite.list_query``)."""
    for field in ("node", "image_id"):
        expr = f"json_extract(spec, '$.{field}')"
        db.execute(f"CREATE INDEX records_spec_{field} ON records (kind, {expr}, name, id) WHERE {expr} IS NOT NULL")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [update_from_v0, update_from_v1]
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(db: sqlite3.Connection) -> int:
    """Bring ``db`` (autocommit mode) to :data:`SCHEMA_VERSION`; returns the number of migrations applied.

    Refuses a database newer than this code knows, instead of guessing.
    """
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise RuntimeError(
            f"the state database has schema version {version} but this minicloud knows only {SCHEMA_VERSION}; "
            "upgrade minicloud before starting it on this data directory"
        )
    applied = 0
    for step in range(version, SCHEMA_VERSION):
        db.execute("BEGIN IMMEDIATE")
        try:
            MIGRATIONS[step](db)
            db.execute(f"PRAGMA user_version = {step + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        applied += 1
    return applied
