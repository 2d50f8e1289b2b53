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


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    methods: set[str] = set()
    routes = list(app.routes)
    while routes:
        route = routes.pop()
        # An included router (FastAPI >= 0.160) holds its routes on the original router.
        original = getattr(route, "original_router", None)
        if original is not None:
            routes.extend(original.routes)
            continue
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(path):
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(CascadeError)
    async def _cascade(_: Request, exc: CascadeError) -> Response:
        return cascade_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        return error_response(422, "invalid_input", format_validation_errors(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            # Starlette names the methods of the first route matching the path only; a path
            # served by several routes (GET and PUT /admin/threshold) allows them all.
            headers["Allow"] = ", ".join(allowed_methods(app, request.url.path))
        return error_response(exc.status_code, "http_error", str(exc.detail), headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal error")
