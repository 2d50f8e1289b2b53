"""OpenTelemetry traces of the serving path: a span per prediction request with its stages
(parse, preprocess, queue, student, teacher) as children, the caller's W3C trace context
followed, and the teacher span's context passed on to Triton in the gRPC call's metadata.

Off unless CASCADE_TRACING__ENDPOINT is set, and then free: `Tracing.off()` answers None to
every `request`, and the serving path checks for None and calls nothing else. On, spans go to
their own TracerProvider (never the process-global one, so several apps in one process, as in
tests, do not share it) and leave through a BatchSpanProcessor: export happens on its thread,
a bounded queue drops spans rather than slow a request.

The batch stages serve several requests with one call, so they are recorded per traced request
with the call's real start and end: the student span of each request in a batch covers the one
student call; the teacher span is live while the teacher is asked, and its context (the first
traced request's) is what Triton receives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..config.tracing import TracingConfig

log = logging.getLogger(__name__)


@dataclass
class RequestTrace:
    """One traced request: its span, and the context its stages are children of."""

    span: Any
    context: Any
    tracer: Any
    marks: dict[str, int] = field(default_factory=dict)  # stage boundaries, time.time_ns()

    def mark(self, name: str) -> None:
        self.marks[name] = time.time_ns()

    def stage(self, name: str, start_ns: int, end_ns: int, **attributes: Any) -> None:
        """A finished stage of this request, as a child span with its real times."""
        span = self.tracer.start_span(
            name, context=self.context, start_time=start_ns, attributes=attributes or None
        )
        span.end(end_time=end_ns)

    def start_stage(self, name: str, **attributes: Any) -> Any:
        return self.tracer.start_span(name, context=self.context, attributes=attributes or None)

    def finish(self, status: int, **attributes: Any) -> None:
        from opentelemetry.trace import Status, StatusCode

        self.span.set_attribute("http.response.status_code", status)
        for key, value in attributes.items():
            self.span.set_attribute(key, value)
        if status >= 500:
            self.span.set_status(Status(StatusCode.ERROR))
        self.span.end()


class Tracing:
    def __init__(self, config: TracingConfig) -> None:
        self.config = config
        self._provider: Any = None
        self._tracer: Any = None
        self._propagator: Any = None
        self.enabled = False  # read on every request: a plain attribute

    def setup(self) -> None:
        if self.config.endpoint is None:
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        provider = TracerProvider(
            resource=Resource.create({"service.name": self.config.service_name}),
            sampler=ParentBased(TraceIdRatioBased(self.config.sample_ratio)),
        )
        provider.add_span_processor(
            BatchSpanProcessor(self._exporter(), max_queue_size=self.config.max_queue_size)
        )
        self._provider = provider
        self._tracer = provider.get_tracer("cascade_server.gateway")
        self._propagator = TraceContextTextMapPropagator()
        self.enabled = True
        log.info(
            "tracing: OTLP (%s) to %s, sampling %.3g",
            self.config.protocol,
            self.config.endpoint,
            self.config.sample_ratio,
        )

    def _exporter(self) -> Any:
        endpoint = self.config.endpoint
        assert endpoint is not None
        if self.config.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            return OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        # The HTTP exporter takes the full URL of the traces endpoint.
        url = endpoint if endpoint.endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"
        return HttpExporter(endpoint=url)

    def request(
        self, name: str, headers: Iterable[tuple[bytes, bytes]], request_id: str
    ) -> RequestTrace | None:
        """A span for one request, continuing the caller's `traceparent` if it sent one; None
        when tracing is off or this request is not sampled."""
        if self._tracer is None:
            return None
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind

        carrier = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in headers
            if k in (b"traceparent", b"tracestate")
        }
        parent = self._propagator.extract(carrier) if carrier else None
        span = self._tracer.start_span(
            name,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": "POST", "cascade.request_id": request_id},
        )
        if not span.is_recording():
            return None
        traced = RequestTrace(span, trace.set_span_in_context(span), self._tracer)
        traced.mark("arrived")
        return traced

    def headers_for(self, span: Any) -> dict[str, str]:
        """The W3C trace context of `span`, as gRPC metadata for the teacher call."""
        from opentelemetry import trace

        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=trace.set_span_in_context(span))
        return carrier

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()  # flushes what is queued, within the SDK's own timeout
            self._provider = self._tracer = None
            self.enabled = False
