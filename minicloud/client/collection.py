"""The SDK's collection of any declared kind: ``list``, ``get``, ``update`` (description/labels) and ``delete``
derived from the kind's declaration (:mod:`minicloud.core.kinds`); a kind's own SDK class adds its create and verbs."""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from minicloud.core.kinds import Kind

if TYPE_CHECKING:
    from minicloud.client import Client

V = TypeVar("V")


def quote(ref: str) -> str:
    return urllib.parse.quote(ref, safe="")


class Collection(Generic[V]):
    """``/v1/<plural>`` of ``kind``: every call decodes into the kind's view type."""

    def __init__(self, client: Client, kind: Kind[Any, Any]) -> None:
        assert kind.view is not None, f"kind {kind.name} is internal"
        self._c = client
        self.kind = kind
        self.path = f"/v1/{kind.plural}"
        self.view: type[V] = kind.view

    def list(self, **query: Any) -> list[V]:
        """Every item (following pages); ``name=`` and ``label='k=v,…'`` filter."""
        return list(self._c.paginate(self.path, self.view, **query))

    def get(self, ref: str) -> V:
        """By id or name."""
        return self._c.call("GET", f"{self.path}/{quote(ref)}", self.view)

    def update(self, ref: str, *, if_match: int | None = None, **fields: Any) -> V:
        """Merge-patch ``description`` and/or ``labels``; with ``if_match`` only at that revision."""
        headers = {"If-Match": f'"{if_match}"'} if if_match is not None else None
        return self._c.call("PATCH", f"{self.path}/{quote(ref)}", self.view, json=fields, headers=headers)

    def delete(self, ref: str, *, if_match: int | None = None) -> None:
        headers = {"If-Match": f'"{if_match}"'} if if_match is not None else None
        self._c.call("DELETE", f"{self.path}/{quote(ref)}", headers=headers)

    def _create(self, body: dict[str, Any], idempotency_key: str | None = None) -> V:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._c.call("POST", self.path, self.view, json=body, headers=headers)
