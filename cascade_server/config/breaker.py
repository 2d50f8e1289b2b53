"""Knobs of the teacher's circuit breaker (gateway/breaker.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class BreakerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Consecutive failed teacher calls (timeouts, unavailable, errors) that open the circuit.
    failures: int = Field(default=5, ge=1, le=1000)
    # How long it stays open before letting probes through.
    open_s: float = Field(default=2.0, gt=0, le=600)
    # Calls let through while half-open; the first success closes, a failure reopens.
    probes: int = Field(default=1, ge=1, le=100)
