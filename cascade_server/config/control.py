"""The runtime control store (gateway/stores.py): thresholds, student versions, their audit."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class ControlConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # `file`: state_dir (one host, or a ReadWriteMany volume); `redis`: every replica.
    kind: Literal["file", "redis"] = "file"
    state_dir: Path = Path(".cascade/state")
    # A secret (it may carry a password): never in a repr, a dump or a log.
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")
    # The most one store operation (an admin change, a lock) may take, retries included; past
    # it the caller gets 503. Redis socket timeouts are a quarter of it.
    timeout_s: float = Field(default=2.0, gt=0, le=60)
    # Entries kept per audit list (Redis) or per audit file generation (file).
    audit_max_entries: int = Field(default=10_000, ge=10)
    # Redis: a PING on the change channel this often; no answer within 3 intervals means a
    # silent partition: the store is reported down and the connection rebuilt.
    health_interval_s: float = Field(default=1.0, gt=0, le=60)
    # Redis: every key re-read this often even without announcements (a missed message).
    resync_s: float = Field(default=30.0, gt=0)
