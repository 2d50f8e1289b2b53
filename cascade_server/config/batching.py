"""Knobs of the student's micro-batcher (gateway/batcher.py)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class BatchingConfig(BaseModel):
    """Validated: a batch holds at least one item."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Items (not requests) at which the collector stops adding requests to a batch. A single
    # request larger than this runs alone; it is never split.
    max_items: int = Field(default=64, ge=1, le=4096)
    # How long the first request of a batch may wait for others. 0: no delay (greedy).
    max_wait_s: float = Field(default=0.0, ge=0.0, le=0.1)
