"""The one settings class. Every knob is a `CASCADE_*` environment variable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .gateway.batcher import BatchingConfig
from .gateway.breaker import BreakerConfig


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CASCADE_", env_nested_delimiter="__", extra="ignore"
    )

    # Cascade bundle directories (comma-separated in the environment).
    bundles: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [Path("bundles/digits"), Path("bundles/intents")]
    )

    # Teacher: Triton's gRPC endpoint and how long one delegated call may take.
    triton_url: str = "127.0.0.1:8001"
    teacher_timeout_s: float = Field(default=1.0, gt=0)
    # gRPC otherwise backs off up to 2 minutes between reconnects after Triton went away.
    teacher_reconnect_backoff_ms: int = Field(default=1000, ge=100)
    readiness_timeout_s: float = Field(default=1.0, gt=0)
    # How often teacher readiness is checked in the background (probes read the cached result).
    readiness_interval_s: float = Field(default=2.0, gt=0)
    # Teacher calls in flight per cascade and worker; past it delegated items are answered
    # degraded at once (a bounded wait for the teacher, not a queue that grows).
    teacher_max_in_flight: int = Field(default=32, ge=1)
    # Circuit breaker on the teacher: CASCADE_TEACHER_BREAKER__FAILURES, __OPEN_S, __PROBES.
    teacher_breaker: BreakerConfig = Field(default_factory=BreakerConfig)

    # Admin API: refused entirely when no token is set.
    admin_token: SecretStr | None = None
    # Runtime control state (thresholds, student versions, their audit logs): `file` keeps it
    # in state_dir (one host, or a ReadWriteMany volume); `redis` in Redis at redis_url, with
    # change notification, for replicas on several hosts.
    control_store: Literal["file", "redis"] = "file"
    state_dir: Path = Path(".cascade/state")
    redis_url: str = "redis://127.0.0.1:6379/0"

    # Request limits.
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    # The whole request body must arrive within this (408 otherwise).
    body_timeout_s: float = Field(default=10.0, gt=0)
    max_image_pixels: int = Field(default=4096 * 4096, gt=0)
    # Pixels across all images of one request.
    max_request_pixels: int = Field(default=2 * 4096 * 4096, gt=0)
    # A request whose encoded images exceed this many bytes is decoded on a thread (Pillow
    # releases the GIL), so that it does not stall the event loop and its probes; small ones
    # are decoded inline, cheaper than a thread hop.
    decode_inline_bytes: int = Field(default=64 * 1024, ge=0)
    decode_threads: int = Field(default=2, ge=1)
    max_batch: int = Field(default=64, gt=0)
    # Requests being handled per worker; past it new ones get 503 with Retry-After at once.
    max_in_flight: int = Field(default=512, gt=0)
    retry_after_s: int = Field(default=1, ge=1)
    max_text_chars: int = Field(default=10_000, gt=0)
    default_top_k: int = Field(default=5, gt=0)

    # Student: ONNX Runtime. One intra-op thread suits a tiny model on a loaded event loop.
    student_device: Literal["cpu", "cuda", "auto"] = "cpu"
    student_threads: int = Field(default=1, gt=0)

    # Cross-request micro-batching of the student (and of the delegated items sent to the
    # teacher): CASCADE_BATCHING__MAX_ITEMS, CASCADE_BATCHING__MAX_WAIT_S.
    batching: BatchingConfig = Field(default_factory=BatchingConfig)

    # On SIGTERM: how long readiness says 503 while requests are still served, before the
    # server stops accepting and drains (0: stop at once, as on Ctrl-C).
    drain_s: float = Field(default=0.0, ge=0, le=300)

    # Adds an `x-cascade-worker` header (the worker's pid): for tests and debugging.
    expose_worker_id: bool = False
    log_level: str = "info"

    @field_validator("bundles", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("admin_token", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value
