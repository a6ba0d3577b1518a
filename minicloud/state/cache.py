"""An exact in-memory cache of committed records for point reads (by id, and by kind/project/name).

It is kept current by the store's commit step itself — created and updated records are written through, deleted ones
dropped — before any writer's ``commit()`` returns, so it never serves a record older than an acknowledged write.
A record read from SQLite on a miss is added only if no commit happened while it was being read. Records are shared
between callers: treat them as immutable (``msgspec.structs.replace`` makes changed copies).
"""

from __future__ import annotations

from collections import OrderedDict

from minicloud.state.records import Change, Record


class RecordCache:
    def __init__(self, max_entries: int = 20_000) -> None:
        self.max_entries = max_entries
        self._by_id: OrderedDict[str, Record] = OrderedDict()
        self._by_name: dict[tuple[str, str, str], str] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def by_id(self, id_: str) -> Record | None:
        record = self._by_id.get(id_)
        if record is not None:
            self._by_id.move_to_end(id_)
        return record

    def by_name(self, kind: str, project: str, name: str) -> Record | None:
        id_ = self._by_name.get((kind, project, name))
        return self.by_id(id_) if id_ is not None else None

    def put(self, record: Record) -> None:
        self.drop(record.id)
        self._by_id[record.id] = record
        self._by_name[(record.kind, record.project, record.name)] = record.id
        while len(self._by_id) > self.max_entries:
            _, evicted = self._by_id.popitem(last=False)
            self._by_name.pop((evicted.kind, evicted.project, evicted.name), None)

    def drop(self, id_: str) -> None:
        old = self._by_id.pop(id_, None)
        if old is not None:
            self._by_name.pop((old.kind, old.project, old.name), None)

    def apply(self, changes: list[Change]) -> None:
        for change in changes:
            if change.type == "deleted":
                self.drop(change.id)
            else:
                self.put(change.record)
