"""The SDK's exceptions: one class per kind of failure, all under :class:`AlignError`.

Every API error carries the HTTP ``status``, the server's stable ``code``, its human ``message``, its
``details`` list (for a rejected dataset: one ``{"line", "code", "message"}`` per bad line) and the
``request_id`` from the ``x-request-id`` response header, so a user can quote it in a bug report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from alignd.types import Job, JobError

__all__ = [
    "APIConnectionError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AlignError",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "DestinationExistsError",
    "IntegrityError",
    "JobFailedError",
    "JobWaitTimeoutError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "ServerError",
    "ServiceUnavailableError",
    "UnsafeArchiveError",
    "UnsupportedMediaTypeError",
    "ValidationError",
]


class AlignError(Exception):
    """Base of every error the SDK raises on purpose."""

    message: str
    status: int | None = None
    code: str | None = None
    request_id: str | None = None
    details: list[dict[str, Any]]

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if code is not None:
            self.code = code
        self.request_id = request_id
        self.details = list(details or [])

    def __str__(self) -> str:
        parts = []
        if self.status is not None:
            parts.append(str(self.status))
        if self.code:
            parts.append(self.code)
        head = " ".join(parts)
        text = f"{head}: {self.message}" if head else self.message
        if self.request_id:
            text += f" (request id {self.request_id})"
        return text


class APIConnectionError(AlignError):
    """The request never got an HTTP answer: refused, reset, DNS, TLS... (after all retries)."""

    code = "connection_error"

    def __init__(self, message: str = "Connection error.", *, request: httpx.Request | None = None) -> None:
        super().__init__(message)
        self.request = request


class APITimeoutError(APIConnectionError):
    """The request timed out (after all retries)."""

    code = "timeout"

    def __init__(self, message: str = "Request timed out.", *, request: httpx.Request | None = None) -> None:
        super().__init__(message, request=request)


class APIResponseValidationError(AlignError):
    """The server answered 2xx with a body that does not match the expected shape."""

    code = "invalid_response"

    def __init__(self, message: str, *, response: httpx.Response | None = None) -> None:
        request_id = response.headers.get("x-request-id") if response is not None else None
        status = response.status_code if response is not None else None
        super().__init__(message, status=status, request_id=request_id)
        self.response = response


class APIStatusError(AlignError):
    """The server answered with a 4xx or 5xx status."""

    status: int

    def __init__(
        self,
        message: str,
        *,
        response: httpx.Response,
        code: str | None = None,
        details: list[dict[str, Any]] | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(
            message,
            status=response.status_code,
            code=code,
            request_id=response.headers.get("x-request-id"),
            details=details,
        )
        self.response = response
        self.body = body


class BadRequestError(APIStatusError):
    status = 400
    code = "bad_request"


class AuthenticationError(APIStatusError):
    status = 401
    code = "unauthorized"


class PermissionDeniedError(APIStatusError):
    status = 403
    code = "forbidden"


class NotFoundError(APIStatusError):
    status = 404
    code = "not_found"


class ConflictError(APIStatusError):
    status = 409
    code = "conflict"


class PayloadTooLargeError(APIStatusError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaTypeError(APIStatusError):
    status = 415
    code = "unsupported_media_type"


class ValidationError(APIStatusError):
    """422: understood but refused; ``details`` names each problem (e.g. a dataset's bad lines)."""

    status = 422
    code = "validation_error"


class RateLimitError(APIStatusError):
    status = 429
    code = "rate_limited"


class ServerError(APIStatusError):
    """Any 5xx."""

    status = 500
    code = "server_error"


class ServiceUnavailableError(ServerError):
    status = 503
    code = "service_unavailable"


_STATUS_TO_ERROR: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: ValidationError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def error_class_for_status(status: int) -> type[APIStatusError]:
    if status in _STATUS_TO_ERROR:
        return _STATUS_TO_ERROR[status]
    if status >= 500:
        return ServerError
    return APIStatusError


def make_status_error(response: httpx.Response) -> APIStatusError:
    """Build the right :class:`APIStatusError` subclass from an error response (body already read).

    Understands the server's ``{"error": {"code", "message", "details"}}`` body and degrades gracefully
    for anything else (a proxy's HTML page, an empty body).
    """
    cls = error_class_for_status(response.status_code)
    body: Any = None
    code: str | None = None
    message: str | None = None
    details: list[dict[str, Any]] | None = None
    try:
        body = response.json()
    except Exception:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        code = err.get("code") if isinstance(err.get("code"), str) else None
        message = err.get("message") if isinstance(err.get("message"), str) else None
        raw_details = err.get("details")
        if isinstance(raw_details, list):
            details = [d if isinstance(d, dict) else {"message": str(d)} for d in raw_details]
    elif isinstance(body, dict) and isinstance(body.get("detail"), str | list):
        message = str(body["detail"])
    if message is None:
        text = ""
        try:
            text = response.text.strip()
        except Exception:
            text = ""
        reason = response.reason_phrase or "error"
        message = f"HTTP {response.status_code} {reason}" + (f": {text[:500]}" if text else "")
    return cls(message, response=response, code=code, details=details, body=body)


class JobFailedError(AlignError):
    """Raised by ``jobs.wait`` when the job ends ``failed`` or ``cancelled``; carries the job."""

    def __init__(self, job: Job) -> None:
        error: JobError | None = job.error
        code = error.code if error is not None and error.code else job.status
        reason = error.message if error is not None and error.message else "no error message"
        super().__init__(f"Job {job.id} {job.status}: {reason}", code=code)
        self.job = job
        self.error = error


class JobWaitTimeoutError(AlignError, TimeoutError):
    """``jobs.wait`` ran out of time before the job finished; the job itself keeps running."""

    code = "wait_timeout"

    def __init__(self, message: str, *, job: Job | None = None) -> None:
        super().__init__(message)
        self.job = job


class IntegrityError(AlignError):
    """A downloaded artifact's sha256 (or size) does not match what the server announced."""

    code = "integrity_error"


class UnsafeArchiveError(AlignError):
    """An archive holds a member that could escape the destination or exhaust the disk; nothing was kept."""

    code = "unsafe_archive"


class DestinationExistsError(AlignError, FileExistsError):
    """``artifacts.download`` / ``safe_extract`` was given a ``dest`` that exists and is not an empty folder.

    Extraction is all-or-nothing (a temporary folder renamed into place), so it never merges into, or
    overwrites, a folder that already holds files.
    """

    code = "destination_exists"
