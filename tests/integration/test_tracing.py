"""Traces over real OTLP/HTTP: a receiver on a free port collects what the gateway exports; the
caller's trace is continued, every stage is a child span, and the teacher call carries the
teacher span's W3C context. Off, no span is made and nothing reaches the teacher's metadata."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from cascade_server.bundle import Bundle

from ..conftest import b64, easy_and_hard, png_bytes

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


class Receiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces with a protobuf body."""

    def __init__(self) -> None:
        self.spans: list = []
        received = self.spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        received.extend(scope.spans)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_a_traced_request_has_every_stage_and_the_teacher_gets_the_context(gateway, demo, receiver):
    _, hard = easy_and_hard(demo, Bundle.load(demo.bundle).manifest.default_threshold, n=1)
    payload = {"image": b64(png_bytes(demo.images[hard[0]]))}
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT}-01", "x-request-id": "req-42"}
    with gateway(tracing={"endpoint": receiver.url}) as (client, teacher):
        r = client.post("/predict", json=payload, headers=headers)
        assert r.status_code == 200 and r.json()["answered_by"] == "teacher"
        assert r.headers["x-request-id"] == "req-42"
    # The app's shutdown flushed the exporter.
    spans = {s.name: s for s in receiver.spans}
    request = spans["POST /predict"]
    assert request.trace_id.hex() == TRACE_ID and request.parent_span_id.hex() == PARENT
    for stage in ("parse", "preprocess", "queue", "student", "teacher"):
        assert spans[stage].trace_id.hex() == TRACE_ID, stage
        assert spans[stage].parent_span_id == request.span_id, stage
        assert spans[stage].end_time_unix_nano >= spans[stage].start_time_unix_nano, stage
    assert spans["parse"].end_time_unix_nano <= spans["preprocess"].end_time_unix_nano
    assert spans["queue"].end_time_unix_nano <= spans["student"].end_time_unix_nano
    # What Triton receives: the teacher span's own context, in the same trace.
    (sent,) = teacher.headers
    assert sent["traceparent"] == f"00-{TRACE_ID}-{spans['teacher'].span_id.hex()}-01"
    attributes = {a.key: a.value for a in request.attributes}
    assert attributes["cascade.request_id"].string_value == "req-42"
    assert attributes["http.response.status_code"].int_value == 200


def test_a_caller_that_did_not_sample_is_followed(gateway, demo, receiver):
    payload = {"image": b64(png_bytes(demo.images[0]))}
    with gateway(tracing={"endpoint": receiver.url}) as (client, _):
        r = client.post(
            "/predict", json=payload, headers={"traceparent": f"00-{TRACE_ID}-{PARENT}-00"}
        )
        assert r.status_code == 200
    assert receiver.spans == []


def test_tracing_off_makes_no_span_and_sends_no_metadata(gateway, demo):
    _, hard = easy_and_hard(demo, Bundle.load(demo.bundle).manifest.default_threshold, n=1)
    payload = {"image": b64(png_bytes(demo.images[hard[0]]))}
    with gateway() as (client, teacher):
        assert not client.app.state.gateway.tracing.enabled
        r = client.post(
            "/predict", json=payload, headers={"traceparent": f"00-{TRACE_ID}-{PARENT}-01"}
        )
        assert r.json()["answered_by"] == "teacher"
        assert len(r.headers["x-request-id"]) == 16  # made up when the caller sent none
    assert teacher.headers == [None]


def test_a_request_id_that_is_not_a_plain_token_is_replaced(gateway, demo):
    payload = {"image": b64(png_bytes(demo.images[0]))}
    with gateway() as (client, _):
        r = client.post("/predict", json=payload, headers={"x-request-id": "a b\tc<script>"})
        assert r.headers["x-request-id"] != "a b\tc<script>"
        assert r.headers["x-request-id"].isalnum()
        bad = client.post("/predict", json={}, headers={"x-request-id": "err-1"})
        assert bad.status_code == 422 and bad.headers["x-request-id"] == "err-1"
