"""Capture of delegated items, the flywheel data (gateway/capture.py): CASCADE_CAPTURE__*."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator


class CaptureConfig(BaseModel):
    """Off unless `directory` is set. **What is captured is user data**: the preprocessed inputs
    of real requests (image pixels, text token ids, from which the text can be read back) with
    both models' answers, kept on disk under `directory/<cascade>/` until `retention_s` or
    `max_bytes` removes them. Turn it on only where the deployment's data policy allows it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    directory: Path | None = None
    # Share of delegated items kept (a Bernoulli draw per item).
    fraction: float = Field(default=1.0, ge=0, le=1)
    # Also keep shadow samples (student answers the teacher also saw) when shadowing is on.
    shadow: bool = True
    # Items waiting to be written, per cascade and worker; past it new items are dropped
    # (counted): capture never holds up serving, nor grows without bound.
    queue_items: int = Field(default=4096, gt=0)
    # Items per shard, and how long a partial shard waits before it is written anyway.
    shard_items: int = Field(default=1024, gt=0)
    flush_s: float = Field(default=5.0, gt=0)
    # Bounds on the cascade's capture directory: oldest shards are deleted first to keep its
    # total size within `max_bytes`, and shards older than `retention_s` (None: no age limit).
    max_bytes: int = Field(default=1 << 30, gt=0)
    retention_s: float | None = Field(default=7 * 24 * 3600.0, gt=0)

    @field_validator("directory", mode="before")
    @classmethod
    def _empty_is_off(cls, value: object) -> object:
        # CASCADE_CAPTURE__DIRECTORY= (set but empty) means off, not the current directory.
        return None if value == "" else value
