"""The one settings class. Every knob is a `CASCADE_*` environment variable.

The variables stay flat (`CASCADE_TEACHER_TIMEOUT_S`, `CASCADE_MAX_BODY_BYTES`: the names the
README, the Helm chart and deployments use); the components never see this class, only the
small models of `cascade_server.config` that the properties below compose. Nothing here imports
the gateway.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .config.batching import BatchingConfig
from .config.breaker import BreakerConfig
from .config.cache import CacheConfig
from .config.capture import CaptureConfig
from .config.cascade import CascadeConfig
from .config.control import ControlConfig
from .config.delegation import ControllerConfig, LoadConfig, OverridesConfig, ShadowConfig
from .config.limits import BodyLimits, DecodeLimits
from .config.student import StudentConfig
from .config.teacher import TeacherConfig
from .config.tracing import TracingConfig


def _knob(model: type[BaseModel], name: str) -> Any:
    """The component's own definition of a knob (type constraints, default), under the flat
    `CASCADE_*` name it has always had: defined once, where the component is."""
    return copy.deepcopy(model.model_fields[name])


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CASCADE_", env_nested_delimiter="__", extra="ignore"
    )

    # Cascade bundle directories (comma-separated in the environment).
    bundles: Annotated[list[Path], NoDecode] = Field(
        default_factory=lambda: [Path("bundles/digits"), Path("bundles/intents")]
    )

    # The teacher (config/teacher.py): CASCADE_TRITON_URL, CASCADE_TEACHER_TIMEOUT_S, ...
    triton_url: str = _knob(TeacherConfig, "url")
    teacher_timeout_s: float = _knob(TeacherConfig, "timeout_s")
    teacher_reconnect_backoff_ms: int = _knob(TeacherConfig, "reconnect_backoff_ms")
    readiness_timeout_s: float = _knob(TeacherConfig, "readiness_timeout_s")
    teacher_max_in_flight: int = _knob(TeacherConfig, "max_in_flight")
    # CASCADE_TEACHER_BREAKER__FAILURES, __OPEN_S, __PROBES.
    teacher_breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    readiness_interval_s: float = _knob(CascadeConfig, "watch_interval_s")

    # Admin API: refused entirely when no token is set.
    admin_token: SecretStr | None = None
    # Runtime control state (config/control.py): CASCADE_CONTROL_STORE, CASCADE_STATE_DIR, ...
    control_store: Literal["file", "redis"] = _knob(ControlConfig, "kind")
    state_dir: Path = _knob(ControlConfig, "state_dir")
    redis_url: SecretStr = _knob(ControlConfig, "redis_url")
    control_timeout_s: float = _knob(ControlConfig, "timeout_s")
    control_audit_max_entries: int = _knob(ControlConfig, "audit_max_entries")
    control_health_interval_s: float = _knob(ControlConfig, "health_interval_s")
    control_resync_s: float = _knob(ControlConfig, "resync_s")

    # Request limits (config/limits.py).
    max_body_bytes: int = _knob(BodyLimits, "max_body_bytes")
    body_timeout_s: float = _knob(BodyLimits, "body_timeout_s")
    max_batch: int = _knob(BodyLimits, "max_batch")
    default_top_k: int = _knob(BodyLimits, "default_top_k")
    max_image_pixels: int = _knob(DecodeLimits, "max_image_pixels")
    max_request_pixels: int = _knob(DecodeLimits, "max_request_pixels")
    max_jpeg_scans: int = _knob(DecodeLimits, "max_jpeg_scans")
    decode_inline_bytes: int = _knob(DecodeLimits, "decode_inline_bytes")
    decode_inline_pixels: int = _knob(DecodeLimits, "decode_inline_pixels")
    decode_inline_chars: int = _knob(DecodeLimits, "decode_inline_chars")
    decode_threads: int = _knob(DecodeLimits, "decode_threads")
    max_text_chars: int = _knob(DecodeLimits, "max_text_chars")
    # Requests being handled per worker; past it new ones get 503 with Retry-After at once.
    max_in_flight: int = Field(default=512, gt=0)
    retry_after_s: int = Field(default=1, ge=1)

    # The student (config/student.py).
    student_device: Literal["cpu", "cuda", "auto"] = _knob(StudentConfig, "device")
    student_threads: int = _knob(StudentConfig, "threads")

    # Cross-request micro-batching of the student (and of the delegated items sent to the
    # teacher): CASCADE_BATCHING__MAX_ITEMS, CASCADE_BATCHING__MAX_WAIT_S.
    batching: BatchingConfig = Field(default_factory=BatchingConfig)

    # On SIGTERM: how long readiness says 503 while requests are still served, before the
    # server stops accepting and drains (0: stop at once, as on Ctrl-C).
    drain_s: float = Field(default=0.0, ge=0, le=300)

    # Live delegation control (config/delegation.py): the controller that holds a target
    # delegation rate or student error online (CASCADE_CONTROLLER__*), load-aware delegation
    # (CASCADE_LOAD__SLO_S, __ACCURACY_FLOOR, ...), shadow samples (CASCADE_SHADOW__FRACTION)
    # and what a request may override (CASCADE_OVERRIDES__ENABLED, ...).
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    load: LoadConfig = Field(default_factory=LoadConfig)
    shadow: ShadowConfig = Field(default_factory=ShadowConfig)
    overrides: OverridesConfig = Field(default_factory=OverridesConfig)
    # Capture of delegated items for training (config/capture.py; stores user inputs, so off
    # unless CASCADE_CAPTURE__DIRECTORY is set): CASCADE_CAPTURE__FRACTION, __MAX_BYTES, ...
    capture: CaptureConfig = Field(default_factory=CaptureConfig)
    # The response cache of both tiers (config/cache.py; off by default):
    # CASCADE_CACHE__ENABLED, __MAX_BYTES, __TIERS.
    cache: CacheConfig = Field(default_factory=CacheConfig)

    # OpenTelemetry traces: CASCADE_TRACING__ENDPOINT (OTLP), __SAMPLE_RATIO, ...
    tracing: TracingConfig = Field(default_factory=TracingConfig)

    # Adds an `x-cascade-worker` header (the worker's pid): for tests and debugging.
    expose_worker_id: bool = False
    log_level: str = "info"
    # `text` (one line per record) or `json` (one object per line, for log shippers).
    log_format: Literal["text", "json"] = "text"

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

    # What each component takes.
    @property
    def body_limits(self) -> BodyLimits:
        return BodyLimits(
            max_body_bytes=self.max_body_bytes,
            body_timeout_s=self.body_timeout_s,
            max_batch=self.max_batch,
            default_top_k=self.default_top_k,
        )

    @property
    def control(self) -> ControlConfig:
        return ControlConfig(
            kind=self.control_store,
            state_dir=self.state_dir,
            redis_url=self.redis_url,
            timeout_s=self.control_timeout_s,
            audit_max_entries=self.control_audit_max_entries,
            health_interval_s=self.control_health_interval_s,
            resync_s=self.control_resync_s,
        )

    @property
    def cascade(self) -> CascadeConfig:
        return CascadeConfig(
            batching=self.batching,
            decode=DecodeLimits(
                max_image_pixels=self.max_image_pixels,
                max_request_pixels=self.max_request_pixels,
                max_jpeg_scans=self.max_jpeg_scans,
                decode_inline_bytes=self.decode_inline_bytes,
                decode_inline_pixels=self.decode_inline_pixels,
                decode_inline_chars=self.decode_inline_chars,
                decode_threads=self.decode_threads,
                max_text_chars=self.max_text_chars,
            ),
            student=StudentConfig(device=self.student_device, threads=self.student_threads),
            teacher=TeacherConfig(
                url=self.triton_url,
                timeout_s=self.teacher_timeout_s,
                reconnect_backoff_ms=self.teacher_reconnect_backoff_ms,
                readiness_timeout_s=self.readiness_timeout_s,
                max_in_flight=self.teacher_max_in_flight,
                breaker=self.teacher_breaker,
            ),
            controller=self.controller,
            load=self.load,
            shadow=self.shadow,
            overrides=self.overrides,
            capture=self.capture,
            cache=self.cache,
            watch_interval_s=self.readiness_interval_s,
        )
