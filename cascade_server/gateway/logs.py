"""Logging for the gateway's processes: every record carries the request id of the prediction
being handled (the caller's `x-request-id`, or one made up and sent back), in text or, with
CASCADE_LOG_FORMAT=json, as one JSON object per line for log shippers (python-json-logger)."""

from __future__ import annotations

import itertools
import logging
import os
import re
from contextvars import ContextVar
from typing import Literal

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")
_SAFE = re.compile(rb"^[A-Za-z0-9._:\-]{1,64}$")
# Made-up ids: a random per-process prefix and a counter (unique per process, no syscall).
_PREFIX = os.urandom(4).hex()
_COUNTER = itertools.count(1)
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The caller's `x-request-id` when it is a plain token (it ends up in logs and headers:
    nothing else is echoed), else a new one."""
    for name, value in headers:
        if name == b"x-request-id" and _SAFE.match(value):
            return value.decode("ascii")
    return f"{_PREFIX}{next(_COUNTER):08x}"


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def configure_logging(level: str, fmt: Literal["text", "json"] = "text") -> None:
    """The root logger of a gateway process (cascade-serve and each uvicorn worker)."""
    handler = logging.StreamHandler()
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(request_id)s %(message)s",
                rename_fields={"levelname": "level", "asctime": "time", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
