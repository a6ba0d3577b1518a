"""The store's data model: records and the write commands (transactions) that change them.

A :class:`Txn` is fully stamped by its proposer — ids, timestamps and every value are in it — so applying it needs only
the command and the revision the log gives it. That is what lets the same transaction be applied by SQLite alone
(single node) or replayed from etcd's watch stream on every replica (cluster) with identical results.
"""

from __future__ import annotations

from typing import Any

import msgspec


class Record(msgspec.Struct, kw_only=True, omit_defaults=False):
    """One resource. ``revision`` is the store-wide revision of the transaction that last wrote it."""

    kind: str
    id: str
    project: str
    name: str
    labels: dict[str, str] = {}
    spec: dict[str, Any] = {}
    status: dict[str, Any] = {}
    revision: int = 0
    created_at: str
    updated_at: str


class Create(msgspec.Struct, tag="create"):
    """Insert ``record``; fails if its id exists or its (kind, project, name) is taken."""

    record: Record


class Update(msgspec.Struct, tag="update"):
    """Replace ``record`` (same kind and id). With ``expect_revision`` it is a compare-and-swap."""

    record: Record
    expect_revision: int | None = None


class Delete(msgspec.Struct, tag="delete"):
    """Remove a record. With ``expect_revision`` it is a compare-and-swap; deleting a missing record fails."""

    kind: str
    id: str
    expect_revision: int | None = None


class Check(msgspec.Struct, tag="check"):
    """Assert that the record exists at revision ``expect_revision``; writes nothing. The transaction fails with
    ``not-found`` or ``revision-mismatch`` otherwise. A write that must not survive a concurrent change of another
    record (a create in a project being deleted) carries a Check on that record."""

    kind: str
    id: str
    expect_revision: int


Op = Create | Update | Delete | Check


class Txn(msgspec.Struct):
    """An atomic multi-record transaction: all ops apply at one revision, or none do.

    ``retention``: this transaction expires old records (the retention leader loops, ``minicloud.retention``, are
    the only code that sets it; no request input reaches it). It lets ``Delete`` ops remove append-only records."""

    ops: list[Op]
    retention: bool = False


class Change(msgspec.Struct, kw_only=True):
    """One entry of the change log (``GET /v1/events``): what a transaction did to one record."""

    revision: int
    type: str  # created | updated | deleted
    kind: str
    id: str
    project: str
    record: Record


#: Kinds whose records can be created but never changed or removed (the audit log).
APPEND_ONLY_KINDS = frozenset({"audit"})


def check_append_only(txn: Txn) -> None:
    """Refuse a transaction that would change or remove a record of an append-only kind (a retention transaction
    may remove them, never change them)."""
    for index, op in enumerate(txn.ops):
        if isinstance(op, Delete) and txn.retention:
            continue
        kind = op.record.kind if isinstance(op, Update) else op.kind if isinstance(op, Delete) else None
        if kind in APPEND_ONLY_KINDS:
            raise TxnFailed(index, "append-only", op)


class TxnFailed(Exception):
    """A transaction's condition failed; nothing was written. ``index`` is the failing op, ``reason`` says which check."""

    def __init__(self, index: int, reason: str, op: Op) -> None:
        super().__init__(f"op {index}: {reason}")
        self.index = index
        self.reason = reason  # "exists" | "name-taken" | "not-found" | "revision-mismatch"
        self.op = op
