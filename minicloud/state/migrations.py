"""Numbered schema migrations. ``MIGRATIONS[n]`` upgrades a database at ``user_version`` n to n + 1.

Each runs in its own transaction together with the ``user_version`` bump, so a crash mid-migration leaves the old
schema intact. Never edit a released migration; append a new one.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


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
INDEXED_SPEC_FIELDS = frozenset({"node", "image_id", "network", "port_network"})


def update_from_v1(db: sqlite3.Connection) -> None:
    """Expression indexes for the lookups request paths make: instances by node (placement, each node's
    reconciler) and by image (refusing to delete an image in use). Partial: only records that have the field.
    A query uses them when it says exactly ``json_extract(spec, '$.node') = ?`` (see ``sqlite.list_query``)."""
    for field in ("node", "image_id"):
        expr = f"json_extract(spec, '$.{field}')"
        db.execute(f"CREATE INDEX records_spec_{field} ON records (kind, {expr}, name, id) WHERE {expr} IS NOT NULL")


def update_from_v2(db: sqlite3.Connection) -> None:
    """Expression indexes for the network reconciler: ports (and subnets, IP allocations…) by network, floating IPs
    by the network of the NIC they are associated with, so a network's reconcile reads only its own records."""
    for field in ("network", "port_network"):
        expr = f"json_extract(spec, '$.{field}')"
        db.execute(f"CREATE INDEX records_spec_{field} ON records (kind, {expr}, name, id) WHERE {expr} IS NOT NULL")


#: The hour of a ledger entry's charge (``2026-10-31T00:00:00Z``), read from the canonical JSON the entry's hash covers;
#: NULL for every other kind and for a charge that is not valid JSON (a tampered entry: ``billing verify`` names it).
CHARGE_HOUR = (
    "json_extract(CASE WHEN kind = 'ledgerentry' AND json_valid(json_extract(spec, '$.charge')) "
    "THEN json_extract(spec, '$.charge') END, '$.hour')"
)


def _charge_hour(record: Any) -> str | None:
    """The Python twin of :data:`CHARGE_HOUR` (a span read's page cursor)."""
    try:
        value = json.loads(record.spec["charge"]).get("hour")
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class SpanKey:
    """A key with a range index: ``Store.list(kind, project=P, span=(key, low, high))`` reads only the records whose
    key is in [low, high), in (key, name, id) order. ``sql`` is the indexed expression (a query must say exactly it),
    ``value`` computes it from a record."""

    sql: str
    value: Callable[[Any], str | None]


#: Keys with a range index (see :class:`SpanKey`).
SPAN_KEYS = {"charge_hour": SpanKey(CHARGE_HOUR, _charge_hour)}


def update_from_v3(db: sqlite3.Connection) -> None:
    """A range index on the ledger entries' charge hour, per project, so a cost report for a day or a week reads that
    range instead of the project's whole ledger. Partial: only ledger entries (the expression is NULL elsewhere)."""
    db.execute(f"CREATE INDEX records_span_charge_hour ON records (kind, project, {CHARGE_HOUR}, name, id) "
               f"WHERE {CHARGE_HOUR} IS NOT NULL")  # fmt: skip


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    update_from_v0,
    update_from_v1,
    update_from_v2,
    update_from_v3,
]
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
