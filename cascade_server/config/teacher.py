"""The teacher client and its load bounds (gateway/teacher.py, gateway/cascade.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .breaker import BreakerConfig


class TeacherConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Triton's gRPC endpoint and how long one delegated call may take.
    url: str = "127.0.0.1:8001"
    timeout_s: float = Field(default=1.0, gt=0)
    # gRPC otherwise backs off up to 2 minutes between reconnects after Triton went away.
    reconnect_backoff_ms: int = Field(default=1000, ge=100)
    readiness_timeout_s: float = Field(default=1.0, gt=0)
    # Teacher calls in flight per cascade and worker; past it delegated items are answered by
    # the student at once (a bounded wait for the teacher, not a queue that grows).
    max_in_flight: int = Field(default=32, ge=1)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
