"""One exception hierarchy for the whole control plane.

Every class carries the HTTP status, a problem ``type`` slug and a message that tells the user what to do. The API's
error middleware renders any :class:`MinicloudError` as RFC 9457 ``application/problem+json``; anything else becomes a
500 with the request id logged, never a traceback in the response. Drivers map their own exceptions onto these classes
at their edge, so raw libvirt/netlink errors never reach a client.
"""

from __future__ import annotations

from typing import Any, ClassVar

PROBLEM_BASE = "https://minicloud.dev/problems/"


class MinicloudError(Exception):
    """Base class: ``status`` is the HTTP status, ``slug`` the last part of the problem ``type`` URI."""

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal"
    title: ClassVar[str] = "Internal error"

    def __init__(
        self,
        detail: str,
        *,
        invalid_params: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.invalid_params = invalid_params or []
        self.headers = headers or {}
        self.extra = extra

    @property
    def type(self) -> str:
        return PROBLEM_BASE + self.slug

    def to_problem(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.type,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        if self.invalid_params:
            body["invalid_params"] = self.invalid_params
        body.update(self.extra)
        return body


class BadRequest(MinicloudError):
    status = 400
    slug = "bad-request"
    title = "The request is malformed"


class ValidationFailed(MinicloudError):
    status = 422
    slug = "validation"
    title = "The request body or parameters are invalid"


class Unauthenticated(MinicloudError):
    status = 401
    slug = "unauthenticated"
    title = "Authentication required"


class Forbidden(MinicloudError):
    status = 403
    slug = "forbidden"
    title = "Not allowed"


class NotFound(MinicloudError):
    status = 404
    slug = "not-found"
    title = "No such resource"


class MethodNotAllowed(MinicloudError):
    status = 405
    slug = "method-not-allowed"
    title = "Method not allowed"


class Conflict(MinicloudError):
    status = 409
    slug = "conflict"
    title = "The request conflicts with the current state"


class AlreadyExists(Conflict):
    slug = "already-exists"
    title = "A resource with that name already exists"


class InUse(Conflict):
    slug = "in-use"
    title = "The resource is still in use"


class InsufficientCapacity(Conflict):
    slug = "insufficient-capacity"
    title = "No node has room for the request"


class Gone(MinicloudError):
    status = 410
    slug = "gone"
    title = "No longer available"


class PreconditionFailed(MinicloudError):
    status = 412
    slug = "precondition-failed"
    title = "The resource changed since you read it"


class PayloadTooLarge(MinicloudError):
    status = 413
    slug = "payload-too-large"
    title = "The request body is too large"


class UnsupportedMediaType(MinicloudError):
    status = 415
    slug = "unsupported-media-type"
    title = "Unsupported media type"


class IdempotencyKeyReused(MinicloudError):
    status = 422
    slug = "idempotency-key-reused"
    title = "The Idempotency-Key was already used for a different request"


class TooManyRequests(MinicloudError):
    status = 429
    slug = "rate-limited"
    title = "Too many requests"


class Unavailable(MinicloudError):
    status = 503
    slug = "unavailable"
    title = "Service unavailable"


class ConfigError(MinicloudError):
    """Invalid configuration; raised at start-up and by ``minicloud config validate``."""

    status = 400
    slug = "config"
    title = "Invalid configuration"
