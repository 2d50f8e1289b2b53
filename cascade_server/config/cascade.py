"""One cascade's components together (gateway/cascade.py): what each of its stages takes."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from .batching import BatchingConfig
from .cache import CacheConfig
from .capture import CaptureConfig
from .delegation import ControllerConfig, LoadConfig, OverridesConfig, ShadowConfig
from .limits import DecodeLimits
from .student import StudentConfig
from .teacher import TeacherConfig


class CascadeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    decode: DecodeLimits = Field(default_factory=DecodeLimits)
    student: StudentConfig = Field(default_factory=StudentConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    load: LoadConfig = Field(default_factory=LoadConfig)
    shadow: ShadowConfig = Field(default_factory=ShadowConfig)
    overrides: OverridesConfig = Field(default_factory=OverridesConfig)
    capture: CaptureConfig = Field(default_factory=CaptureConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    # How often the background watch checks the teacher's readiness and follows student
    # versions rolled out through another worker.
    watch_interval_s: float = Field(default=2.0, gt=0)
