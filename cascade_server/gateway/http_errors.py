"""The one mapping of errors to HTTP: `{"error": {"code": ..., "message": ...}}`.

Domain errors carry their status; anything unexpected is logged with its traceback and answered
with a generic 500 that leaks nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from ..errors import CascadeError, format_validation_errors

log = logging.getLogger(__name__)
JSON = "application/json"


def error_body(code: str, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message}})


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    return Response(error_body(code, message), status_code=status, media_type=JSON, headers=headers)


def cascade_error_response(exc: CascadeError) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return error_response(exc.status, exc.code, exc.message, headers)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(CascadeError)
    async def _cascade(_: Request, exc: CascadeError) -> Response:
        return cascade_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        return error_response(422, "invalid_input", format_validation_errors(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, "http_error", str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error")
