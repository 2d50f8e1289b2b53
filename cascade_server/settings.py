"""The one settings class. Every knob is a `CASCADE_*` environment variable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .gateway.batcher import BatchingConfig


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

    # Admin API: refused entirely when no token is set.
    admin_token: SecretStr | None = None
    # Runtime state (threshold overrides and their audit log), shared by all worker processes.
    state_dir: Path = Path(".cascade/state")

    # Request limits.
    max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    max_image_pixels: int = Field(default=4096 * 4096, gt=0)
    max_batch: int = Field(default=64, gt=0)
    max_text_chars: int = Field(default=10_000, gt=0)
    default_top_k: int = Field(default=5, gt=0)

    # Student: ONNX Runtime. One intra-op thread suits a tiny model on a loaded event loop.
    student_device: Literal["cpu", "cuda", "auto"] = "cpu"
    student_threads: int = Field(default=1, gt=0)

    # Cross-request micro-batching of the student (and of the delegated items sent to the
    # teacher): CASCADE_BATCHING__MAX_ITEMS, CASCADE_BATCHING__MAX_WAIT_S.
    batching: BatchingConfig = Field(default_factory=BatchingConfig)

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
