"""``Context``: who acts, where, and under which request — what every service takes instead of an HTTP request.

An HTTP handler builds one from its request (:func:`minicloud.api.resources.context_of`); a leader loop or a
reconciler builds one with :meth:`Context.system`. Services never see aiohttp, so all of them get the same audit,
idempotency and validation whoever calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from minicloud import ids

DEFAULT_PROJECT = "default"


class Caller(Protocol):
    """What a service needs of the principal: ``ref`` (``user:usr-…``, ``system:retention``, ``local:root``), what
    audit records and idempotency keys are scoped by; ``admin`` for cluster-wide rights."""

    @property
    def ref(self) -> str: ...

    @property
    def admin(self) -> bool: ...


@dataclass(frozen=True)
class SystemCaller:
    """The platform itself (a leader loop, a reconciler): audited as ``system:<name>``."""

    name: str
    admin: bool = True
    kind: str = "system"
    ref: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ref", f"system:{self.name}")


class Sealer(Protocol):
    """Encrypts what must not be at rest in clear (the node key store, ``minicloud.iam.keystore.KeyStore``)."""

    def encrypt(self, plaintext: bytes, associated_data: bytes) -> str: ...

    def decrypt(self, token: str, associated_data: bytes) -> bytes: ...


@dataclass(frozen=True)
class Idempotency:
    """A request's ``Idempotency-Key`` as the write layer needs it: the id of the record that stores the first
    reply (scoped to the caller and the key), a fingerprint of the request (same key, other request → 422), and
    the sealer that encrypts the stored reply (replies may carry one-time secrets)."""

    record_id: str
    fingerprint: str
    sealer: Sealer
    ttl: int = 86400


@dataclass(frozen=True, kw_only=True)
class Context:
    principal: Caller
    #: The project the call acts in (``default`` unless chosen).
    project: str = DEFAULT_PROJECT
    #: The IAM action the caller was authorised for; audit records it.
    action: str = ""
    request_id: str = ""
    idempotency: Idempotency | None = None
    #: Where the call came from, for audit: a client address, ``unix``, or ``system``.
    source: str = "system"
    #: The HTTP method and path for audit (empty outside HTTP).
    method: str = ""
    path: str = ""
    #: The writer's clock (RFC 3339 strings): services stamp records with it, tests can fix it.
    clock: Callable[[], str] = ids.now
    #: Anything an adapter wants to carry to its own callbacks (never read by the platform).
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def system(cls, name: str, *, project: str = DEFAULT_PROJECT, action: str = "") -> Context:
        """The context of the platform's own work (leader loops, reconcilers)."""
        return cls(principal=SystemCaller(name), project=project, action=action or f"system:{name}")

    def scope(self, cluster_level: bool) -> str:
        """The project a record lives in: ``""`` for cluster-level kinds, else the context's project."""
        return "" if cluster_level else self.project
