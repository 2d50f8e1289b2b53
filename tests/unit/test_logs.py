"""Log records carry the request id; the JSON format is one object per line."""

import io
import json
import logging

import pytest

from cascade_server.gateway.logs import REQUEST_ID, configure_logging, request_id


@pytest.fixture
def root_restored():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_records_carry_the_request_id(root_restored, fmt):
    configure_logging("info", fmt)
    out = io.StringIO()
    root_restored.handlers[0].setStream(out)
    token = REQUEST_ID.set("req-7")
    try:
        logging.getLogger("cascade_server.x").warning("teacher %s failed", "digits")
    finally:
        REQUEST_ID.reset(token)
    logging.getLogger("cascade_server.x").warning("outside a request")
    first, second = out.getvalue().splitlines()
    if fmt == "json":
        record = json.loads(first)
        assert record["request_id"] == "req-7" and record["message"] == "teacher digits failed"
        assert record["level"] == "WARNING" and record["logger"] == "cascade_server.x"
        assert json.loads(second)["request_id"] == "-"
    else:
        assert "[req-7]: teacher digits failed" in first and "[-]: outside" in second


def test_only_plain_request_ids_are_echoed():
    assert request_id([(b"x-request-id", b"abc-123_X.y:z")]) == "abc-123_X.y:z"
    for bad in (b"", b"a b", b"x" * 65, b"\xff", b"a\nb"):
        made = request_id([(b"x-request-id", bad)])
        assert made != bad.decode("latin-1") and len(made) == 16
