"""OpenTelemetry traces of the serving path (gateway/tracing.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TracingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # OTLP endpoint (e.g. http://otel-collector:4318 for http/protobuf, otel-collector:4317
    # for grpc). Unset: tracing is off and the serving path creates no span at all.
    endpoint: str | None = None
    protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    # Share of requests traced when the caller sent no sampled traceparent (parent-based:
    # a caller's decision is followed).
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    service_name: str = "cascade-gateway"
    # Bound on spans waiting for export; past it spans are dropped (and counted by the SDK),
    # never a request slowed.
    max_queue_size: int = Field(default=2048, ge=1)
