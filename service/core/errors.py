"""One error type with a stable machine-readable ``code``; the API maps it to JSON.

Every 4xx/503 the service answers is raised as an :class:`AlignError` (or a subclass), so routes never
build error bodies by hand and a test can trigger each code.
"""

from __future__ import annotations

from typing import Any


class AlignError(Exception):
    """An error a client can act on: HTTP status, stable code, human message, optional details."""

    status: int = 400
    code: str = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.details: list[dict[str, Any]] = details or []
        self.headers: dict[str, str] = headers or {}

    def to_body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class AuthenticationError(AlignError):
    status = 401
    code = "unauthorized"


class NotFoundError(AlignError):
    status = 404
    code = "not_found"

    @classmethod
    def for_resource(cls, kind: str, resource_id: str) -> NotFoundError:
        return cls(f"No {kind} with id '{resource_id}'.", code=f"{kind}_not_found")


class ConflictError(AlignError):
    status = 409
    code = "conflict"


class PayloadTooLargeError(AlignError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaTypeError(AlignError):
    status = 415
    code = "unsupported_media_type"


class ValidationFailed(AlignError):
    status = 422
    code = "validation_error"


class RateLimitedError(AlignError):
    status = 429
    code = "rate_limited"


class ServiceUnavailableError(AlignError):
    """A dependency (database, queue, storage) is unreachable; the client should retry later."""

    status = 503
    code = "service_unavailable"

    def __init__(self, message: str, *, code: str | None = None, retry_after: int = 5) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after)})
