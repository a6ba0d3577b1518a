"""The events stream's service: committed changes of public kinds, replayed from a revision, then live.

:class:`Watch` is what ``GET /v1/events`` (:mod:`minicloud.api.events`) iterates; it knows no HTTP. Each change is
rendered through its kind's declaration (:data:`minicloud.core.kinds.REGISTRY`: ``kind.view_record``); a change of
an internal kind (no view: idempotency keys, API key hashes, audit entries, nodes, join tokens) never leaves the
node. Ordering contract: the live feed is subscribed *before* the replay is read, and live entries already replayed
are skipped by revision, so a client resuming from ``since`` sees every later change once, in revision order.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from minicloud import errors
from minicloud.core.kinds import public_kinds
from minicloud.model import Event
from minicloud.state import Change, Compacted, Record, Store

#: Changes read from the log per query while replaying.
REPLAY_WINDOW = 1000

#: A kind's renderer: stored record → public view (a msgspec struct).
View = Callable[[Record], Any]


class HistoryCompacted(errors.Gone):
    """``since`` is older than the change log keeps: re-list, then resume from the revision the list reflects."""


def declared_view(kind: str) -> View | None:
    """The renderer of a public declared kind, None for an internal or unknown one."""
    declared = public_kinds().get(kind)
    return declared.view_record if declared is not None else None


def event(change: Change, view: View) -> Event:
    return Event(
        revision=change.revision,
        type=change.type,  # type: ignore[arg-type]
        kind=change.kind,
        id=change.id,
        project=change.project,
        object=msgspec.to_builtins(view(change.record)),
    )


class Watch:
    """Changes after ``since`` (default: the current revision) that ``accept`` admits, as :class:`Event`s rendered
    by ``view(kind)`` (changes of kinds it has no renderer for are dropped).

    Iterating ends when :meth:`close` is called or the subscription overflows (``overflowed``: the consumer was too
    slow or the replica was reset; resume from ``last``). Raises :class:`HistoryCompacted` when ``since`` is no
    longer in the change log. Construct it where the feed must start: it subscribes at once."""

    def __init__(
        self,
        store: Store,
        *,
        since: int | None,
        accept: Callable[[Change], bool],
        view: Callable[[str], View | None] = declared_view,
    ) -> None:
        self._store = store
        self._accept = accept
        self._view = view
        self._sub = store.subscribe()
        #: The revision up to which every change has been seen.
        self.last = store.revision if since is None else since

    @property
    def overflowed(self) -> bool:
        return self._sub.overflowed

    def close(self) -> None:
        self._sub.close()

    def _render(self, change: Change) -> Event | None:
        if not self._accept(change):
            return None
        view = self._view(change.kind)
        return event(change, view) if view is not None else None

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            head = self._store.revision
            while self.last < head:
                upper = min(self.last + REPLAY_WINDOW, head)
                for change in await self._store.changes(self.last, limit=1_000_000, until=upper):
                    if (rendered := self._render(change)) is not None:
                        yield rendered
                self.last = upper
            # Changes up to ``replayed`` came from the log; later ones are live. One transaction is several changes
            # with the same revision: skip by the replayed mark, not by the last change yielded, or all but the
            # first change of a multi-record transaction would be lost.
            replayed = self.last
            async for change in self._sub:
                if change.revision <= replayed:
                    continue
                self.last = change.revision
                if (rendered := self._render(change)) is not None:
                    yield rendered
        except Compacted as exc:
            raise HistoryCompacted(
                f"changes up to revision {exc.compacted} are no longer kept; list the resources again "
                "and resume from a newer revision"
            ) from None
        finally:
            self.close()
