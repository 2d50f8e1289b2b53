"""Domain errors, shared by the gateway and training; no web framework here.

Each error carries its HTTP status and a stable code so the gateway maps every one of them to a
response in one place (`gateway/http_errors.py`); training raises the same errors without
importing FastAPI.
"""

from __future__ import annotations


class CascadeError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class BadRequest(CascadeError):
    status, code = 400, "bad_request"


class InvalidInput(CascadeError):
    status, code = 422, "invalid_input"


class PayloadTooLarge(CascadeError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(CascadeError):
    status, code = 415, "unsupported_media_type"


class RequestTimeout(CascadeError):
    status, code = 408, "request_timeout"


class UnknownCascade(CascadeError):
    status, code = 404, "unknown_cascade"


class Unauthorized(CascadeError):
    status, code = 401, "unauthorized"


class Forbidden(CascadeError):
    status, code = 403, "forbidden"


class ServiceUnavailable(CascadeError):
    """A dependency the request needs is down (the control store, for an admin change)."""

    status, code = 503, "unavailable"


class Overloaded(CascadeError):
    """Refused for load, with when to retry (`Retry-After`): an explicit refusal the client can
    act on, not a queue that grows."""

    status, code = 503, "overloaded"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TeacherUnavailable(Exception):
    """The teacher could not answer in time. Never reaches the client: the gateway degrades to
    the student's answer. `kind` is the metrics label: timeout | unavailable | error."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def format_validation_errors(errors: list) -> str:
    """pydantic's error list as one readable sentence: `inputs.0.image: Field required`."""
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"
