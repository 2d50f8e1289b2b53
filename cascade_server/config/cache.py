"""The response cache of the cascade's tiers (gateway/cache.py): CASCADE_CACHE__*."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class CacheConfig(BaseModel):
    """Off by default. Each worker process holds its own cache, so the bounds are per worker
    and per cascade."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = False
    max_entries: int = Field(default=100_000, gt=0)
    # The bound that matters for memory: digests + rows + a fixed overhead per entry.
    max_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    # Which tiers cache ("student", "teacher", or a stage name of an N-stage cascade); a tier
    # not listed never does.
    tiers: tuple[str, ...] = ("student", "teacher")

    @field_validator("tiers")
    @classmethod
    def _named(cls, tiers: tuple[str, ...]) -> tuple[str, ...]:
        if any(not t for t in tiers):
            raise ValueError("a tier name is empty")
        return tiers
