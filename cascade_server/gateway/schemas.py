"""The request and response models of the HTTP API, for the OpenAPI schema and for refusing
invalid JSON with a precise message. Valid requests are parsed without building them
(parsing.py) and answers are serialised from dicts with orjson; these models describe both."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class InputItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str | None = Field(default=None, description="base64 PNG/JPEG/... (data: URL ok)")
    text: str | None = Field(default=None, description="a text, for text cascades")

    @model_validator(mode="after")
    def _one_of(self) -> InputItem:
        if (self.image is None) == (self.text is None):
            raise ValueError("each input has exactly one of `image` and `text`")
        return self


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str | None = Field(default=None, description="one base64 image")
    text: str | None = Field(default=None, description="one text")
    inputs: list[InputItem] | None = Field(default=None, description="a batch, answered in order")
    cascade: str | None = Field(default=None, description="which cascade; optional if one fits")
    # Strict: `true`, "2" or 2.0 are not a count (the query string refuses them too).
    top_k: Annotated[int, Field(ge=1, strict=True)] | None = None
    # Per-request options (off unless CASCADE_OVERRIDES__ENABLED; within the operator's limits).
    delegate: Literal["auto", "never", "always"] | None = Field(
        default=None, description="who answers: the policy, always the student, the teacher"
    )
    threshold: Annotated[float, Field(ge=0.0, le=1.0, strict=True)] | None = Field(
        default=None, description="this request's own threshold"
    )
    deadline_ms: Annotated[float, Field(gt=0, strict=True)] | None = Field(
        default=None,
        description="answer within this; the teacher is skipped when its p95 does not fit "
        "(also the x-request-timeout-ms header)",
    )

    @model_validator(mode="after")
    def _one_of(self) -> PredictRequest:
        if sum(x is not None for x in (self.image, self.text, self.inputs)) != 1:
            raise ValueError("give exactly one of `image`, `text` (one input) or `inputs` (a list)")
        return self


class ClassProbability(BaseModel):
    label: str
    class_id: int
    probability: float


class StageTimings(BaseModel):
    preprocess: float = Field(description="this request's decoding / tokenisation, ms")
    queue: float = Field(description="waiting for its micro-batch to start, ms")
    student: float = Field(description="the student call that served this request's batch, ms")
    teacher: float = Field(description="the teacher call, 0 when nothing was delegated, ms")
    total: float = Field(description="the whole request inside the gateway, ms")
    tiers: float | None = Field(
        default=None, description="N-stage cascades: the tier calls of this request's batch, ms"
    )


class Prediction(BaseModel):
    """The answer for one input."""

    label: str
    class_id: int
    top_k: list[ClassProbability]
    margin: float = Field(description="the student's top-1 minus top-2 probability")
    threshold: float = Field(
        description="delegation threshold in force for this answer (the request's own if it "
        "gave one)"
    )
    delegated: bool = Field(description="the policy wanted the teacher for this input")
    answered_by: str = Field(
        description="the stage whose answer this is: student | teacher, or a tier's name in an "
        "N-stage cascade"
    )
    outcome: str = Field(
        description="why: confident | delegated | forced_teacher | forced_student | "
        "teacher_failed | circuit_open | teacher_busy | deadline"
    )
    degraded: bool = Field(
        description="delegated, but the teacher failed or its circuit is open: the student answered"
    )
    cascade: str
    versions: dict[str, str]
    timings_ms: StageTimings
    truncated: bool | None = Field(
        default=None, description="text cascades: the text was cut to the student's max length"
    )


class BatchPrediction(BaseModel):
    """The answer for `inputs` (or several uploaded files), in request order."""

    outputs: list[Prediction]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ProtocolError(BaseModel):
    """Errors of the Open Inference Protocol routes, in that protocol's shape."""

    error: str


def documented_errors(model: type[BaseModel], codes: dict[int, str]) -> dict[int | str, Any]:
    """FastAPI `responses=` for the error answers a router gives."""
    return {code: {"model": model, "description": text} for code, text in codes.items()}
