"""Domain errors and their one mapping to HTTP.

Handlers answer `{"error": {"code": ..., "message": ...}}`. Anything unexpected is logged with
its traceback and answered with a generic 500 that leaks nothing.
"""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = logging.getLogger(__name__)


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


class UnknownCascade(CascadeError):
    status, code = 404, "unknown_cascade"


class Unauthorized(CascadeError):
    status, code = 401, "unauthorized"


class Forbidden(CascadeError):
    status, code = 403, "forbidden"


class NotReady(CascadeError):
    status, code = 503, "not_ready"


class TeacherUnavailable(Exception):
    """The teacher could not answer in time. Never reaches the client: the gateway degrades to
    the student's answer. `kind` is the metrics label: timeout | unavailable | error."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> Response:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(CascadeError)
    async def _cascade(_: Request, exc: CascadeError) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.code, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        return error_response(422, "invalid_input", format_validation_errors(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error")


def format_validation_errors(errors: list) -> str:
    """pydantic's error list as one readable sentence: `inputs.0.image: Field required`."""
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"
