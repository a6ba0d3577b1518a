"""Resource kinds, declared once: name, plural, scope, typed ``Spec``/``Status``, view, IAM actions, CLI columns.

A :class:`Kind` is the single declaration the generic machinery reads (Kubernetes' generic registry + per-kind
strategy): the store keeps records as JSON, and at the service boundary a record becomes an :class:`Obj` whose
``spec`` and ``status`` are the kind's msgspec structs (:meth:`Kind.load`), and back (:meth:`Kind.dump`). Nothing
outside the state layer reads ``record.spec["..."]``.

From a declaration the platform derives, without per-kind code:

- the HTTP routes ``GET /v1/<plural>``, ``GET/PATCH/DELETE /v1/<plural>/{ref}`` with their authorisation
  (``<action>:list|get|update|delete``) and their OpenAPI entries (:mod:`minicloud.api.generic`);
- the services behind them (:mod:`minicloud.core.crud`), callable without HTTP;
- the SDK collection (:class:`minicloud.client.Collection`) and the CLI's ``list|show|delete`` verbs
  (:mod:`minicloud.cli.generic`);
- the events stream's rendering of a change.

A kind writes by hand only its create, its custom verbs and its validation. This module imports msgspec alone, so the
SDK and the CLI can read declarations without the server's dependencies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import msgspec

from minicloud import ids

if TYPE_CHECKING:  # the SDK and the CLI read declarations without the server's packages (aiosqlite)
    from minicloud.state.records import Record

S = TypeVar("S", bound=msgspec.Struct)
T = TypeVar("T", bound=msgspec.Struct)


class NoStatus(msgspec.Struct, kw_only=True):
    """The status of a kind that has none (the node reports nothing about it)."""


class Obj(msgspec.Struct, Generic[S, T], kw_only=True):
    """A record with its spec and status decoded into its kind's types. Immutable by convention: change it with
    :meth:`replace` and write it back through a service."""

    kind: str
    id: str
    project: str
    name: str
    labels: dict[str, str] = {}
    spec: S
    status: T
    revision: int = 0
    created_at: str
    updated_at: str

    def replace(self, **changes: Any) -> Obj[S, T]:
        return msgspec.structs.replace(self, **changes)

    def common_fields(self) -> dict[str, Any]:
        """The fields every public resource representation shares (``minicloud.model.Resource``)."""
        return {
            "id": self.id,
            "name": self.name,
            "project": self.project,
            "labels": self.labels,
            "revision": self.revision,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }


Verb = Literal["list", "show", "patch", "delete"]
ALL_GENERIC: frozenset[Verb] = frozenset({"list", "show", "patch", "delete"})


@dataclass(frozen=True, eq=False)
class Column:
    """One column of ``minicloud <noun> list``: its header and the view attribute (dotted path) it shows."""

    header: str
    path: str


@dataclass(frozen=True, eq=False)
class Kind(Generic[S, T]):
    """The declaration of one resource kind. See the module docstring for what is derived from it."""

    #: Stored kind name (``keypair``); also the events stream's ``kind``.
    name: str
    #: URL collection (``/v1/keypairs``) and SDK attribute.
    plural: str
    #: Id prefix (``kp`` → ``kp-…``).
    prefix: str
    spec: type[S]
    status: type[Any] = NoStatus
    #: ``project``: each record lives in one project; ``cluster``: records of the cluster itself (project "").
    scope: Literal["project", "cluster"] = "project"
    #: IAM action prefix: the generic verbs authorise ``<action>:list|get|update|delete``.
    action: str = ""
    #: The public representation (a ``minicloud.model`` struct); None for internal kinds, never shown to clients.
    view: type[Any] | None = None
    #: Object → view. Default: the common fields, then every spec and status field the view declares.
    render: Callable[[Obj[S, Any]], Any] | None = None
    #: The CLI noun (``minicloud keypair …``).
    noun: str = ""
    #: Human name for messages ("key pair").
    title: str = ""
    columns: tuple[Column, ...] = ()
    #: The body of the generic ``PATCH`` (description/labels merge patch); None: no generic patch.
    patch: type[Any] | None = None
    #: Which generic verbs the platform serves for this kind (a kind with its own delete leaves "delete" out).
    generic: frozenset[Verb] = field(default=ALL_GENERIC)

    # -- typed records -----------------------------------------------------------------------------------------
    def load(self, record: Record) -> Obj[S, Any]:
        """The record with its spec and status decoded (unknown stored fields are ignored: forward compatible)."""
        return Obj(
            kind=record.kind,
            id=record.id,
            project=record.project,
            name=record.name,
            labels=record.labels,
            spec=msgspec.convert(record.spec, self.spec),
            status=msgspec.convert(record.status, self.status),
            revision=record.revision,
            created_at=record.created_at,
            updated_at=record.updated_at,
        )

    def dump(self, obj: Obj[S, Any]) -> Record:
        """The stored form of ``obj``."""
        from minicloud.state.records import Record

        return Record(
            kind=self.name,
            id=obj.id,
            project=obj.project,
            name=obj.name,
            labels=dict(obj.labels),
            spec=msgspec.to_builtins(obj.spec),
            status=msgspec.to_builtins(obj.status),
            revision=obj.revision,
            created_at=obj.created_at,
            updated_at=obj.updated_at,
        )

    def new(
        self,
        *,
        project: str,
        name: str,
        spec: S,
        status: Any = None,
        labels: dict[str, str] | None = None,
        id: str | None = None,
        stamp: str | None = None,
    ) -> Obj[S, Any]:
        """A new object of this kind, stamped by the writer (id, times): deterministic replicas need it so."""
        stamp = stamp or ids.now()
        return Obj(
            kind=self.name,
            id=id or ids.new_id(self.prefix),
            project="" if self.scope == "cluster" else project,
            name=name,
            labels=dict(labels or {}),
            spec=spec,
            status=status if status is not None else self.status(),
            created_at=stamp,
            updated_at=stamp,
        )

    # -- views -------------------------------------------------------------------------------------------------
    @property
    def public(self) -> bool:
        return self.view is not None

    def to_view(self, obj: Obj[S, Any]) -> Any:
        if self.render is not None:
            return self.render(obj)
        if self.view is None:
            raise TypeError(f"kind {self.name} is internal: it has no view")
        return default_render(self.view, obj)

    def view_record(self, record: Record) -> Any:
        """The public view of a stored record (what responses and the events stream show)."""
        return self.to_view(self.load(record))

    @property
    def label(self) -> str:
        return self.title or self.name

    def actions(self, verb: str) -> str:
        return f"{self.action}:{verb}"


_FIELDS: dict[type, frozenset[str]] = {}


def _field_names(cls: type) -> frozenset[str]:
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = frozenset(f.name for f in msgspec.structs.fields(cls))
    return names


def default_render(view: type[Any], obj: Obj[Any, Any]) -> Any:
    """``view(**common fields, **spec fields, **status fields)``, each only where the view declares it; a view
    field named ``status`` receives the whole status struct converted to the view's type."""
    wanted = _field_names(view)
    values = {k: v for k, v in obj.common_fields().items() if k in wanted}
    for part in (obj.spec, obj.status):
        for name in _field_names(type(part)):
            if name in wanted and name not in values:
                values[name] = getattr(part, name)
    return view(**values)


#: Every declared kind, by stored name. Internal kinds (no view) are here too; ``PUBLIC`` filters them.
REGISTRY: dict[str, Kind[Any, Any]] = {}


def declare(kind: Kind[S, T]) -> Kind[S, T]:
    """Register ``kind``; its name must be new (a kind is declared once)."""
    existing = REGISTRY.get(kind.name)
    if existing is not None and existing is not kind:
        raise ValueError(f"kind {kind.name!r} is declared twice")
    REGISTRY[kind.name] = kind
    return kind


def public_kinds() -> dict[str, Kind[Any, Any]]:
    return {name: k for name, k in REGISTRY.items() if k.public}
