"""What a run directory holds, typed: file names in one place, and pydantic records for the JSON
files the stages write and read (record.json, teacher.json, student.json), so a stage reads
fields, not dictionary keys.

    config.yaml           the experiment as run
    record.json           Record: provenance, sizes, timings, accuracies per stage
    teacher.pt + .json    a trained or imported PyTorch teacher (TeacherMeta), or teacher.onnx
    teacher_logits.npz    the teacher's logits per split (keyed by data and teacher file)
    student.pt + .json    the distilled student (StudentMeta)
    calibration.json, stages.json, evaluation.json
    capture.json + capture_holdout.npz   a student distilled with capture (capture_data.py)
    *.ckpt                per-epoch checkpoints (resume)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ..policy import Decision, class_probabilities, decide, in_domain_mask


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeacherMeta(_Record):
    """teacher.json: how to rebuild the PyTorch teacher around teacher.pt."""

    arch: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    in_shape: tuple[int, ...]
    num_classes: int


class EnsembleMeta(_Record):
    members: int
    connect: bool
    member_kwargs: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class OutputPolicy:
    """How the student's outputs turn into decisions, as the gateway applies them
    (cascade_server.policy): class per output (-1 abstains), the abstain output, and a bool
    mask of in-domain outputs (class-based delegation). The default: a plain classifier."""

    output_classes: tuple[int, ...] | None = None
    abstain_output: int | None = None
    in_domain_outputs: np.ndarray | None = None

    def decide(self, logits: np.ndarray, threshold: float) -> Decision:
        return decide(
            logits,
            threshold,
            abstain_output=self.abstain_output,
            in_domain_outputs=self.in_domain_outputs,
        )

    def predictions(self, logits: np.ndarray, num_classes: int) -> np.ndarray:
        """Class ids the student answers with (abstain outputs never win)."""
        probs = decide(logits, 0.0).probs
        return class_probabilities(probs, self.output_classes, num_classes).argmax(1)


class StudentMeta(_Record):
    """student.json: the student's architecture and what its outputs mean."""

    arch: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    method: str
    method_params: dict[str, Any] = Field(default_factory=dict)
    output_classes: list[int] | None = None
    abstain_output: int | None = None
    in_domain_classes: list[int] | None = None
    stages: int = 1
    ensemble: EnsembleMeta | None = None

    def outputs(self, num_classes: int) -> int:
        return len(self.output_classes) if self.output_classes else num_classes

    def policy(self, num_classes: int) -> OutputPolicy:
        return OutputPolicy(
            output_classes=tuple(self.output_classes) if self.output_classes else None,
            abstain_output=self.abstain_output,
            in_domain_outputs=in_domain_mask(
                self.in_domain_classes, self.output_classes, num_classes
            ),
        )


class TeacherSummary(_Record):
    arch: str
    params: dict[str, Any] = Field(default_factory=dict)
    source: str  # trained, checkpoint, onnx
    seconds: float
    parameters: int | None = None
    macs: int | None = None
    train_accuracy: float
    val_accuracy: float
    test_accuracy: float


class StudentSummary(_Record):
    arch: str
    params: dict[str, Any] = Field(default_factory=dict)
    method: str
    method_params: dict[str, Any] = Field(default_factory=dict)
    seconds: float
    parameters: int | None = None
    macs: int | None = None
    loss_history: list[float] = Field(default_factory=list)


class CalibrationSummary(_Record):
    threshold: float
    target_delegation_rate: float
    val_student_accuracy: float
    val_teacher_accuracy: float
    stages: list[dict[str, Any]] = Field(default_factory=list)


class Record(_Record):
    """record.json, filled in stage by stage."""

    name: str | None = None
    seed: int | None = None
    data_fingerprint: str | None = None
    preprocess: dict[str, Any] | None = None
    torch: str | None = None
    python: str | None = None
    world_size: int | None = None
    teacher: TeacherSummary | None = None
    student: StudentSummary | None = None
    calibration: CalibrationSummary | None = None
    evaluation: dict[str, Any] | None = None
    # The captured items the student was distilled with too (train/capture_data.py).
    capture: dict[str, Any] | None = None

    def cost_ratio(self) -> float:
        """Student MACs per teacher MAC (0 when either is unknown, e.g. an ONNX teacher)."""
        s = self.student.macs if self.student else None
        t = self.teacher.macs if self.teacher else None
        return s / t if s and t else 0.0


@dataclass(frozen=True)
class RunDir:
    """A run directory and its files."""

    path: Path

    CONFIG = "config.yaml"
    RECORD = "record.json"
    TEACHER_WEIGHTS = "teacher.pt"
    TEACHER_META = "teacher.json"
    TEACHER_ONNX = "teacher.onnx"
    TEACHER_LOGITS = "teacher_logits.npz"
    STUDENT_WEIGHTS = "student.pt"
    STUDENT_META = "student.json"
    CALIBRATION = "calibration.json"
    STAGES = "stages.json"
    EVALUATION = "evaluation.json"
    TOKENIZER_KEY = "tokenizer.key"  # beside the bundle's tokenizer.json: what it was trained on

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def record(self) -> Record:
        path = self / self.RECORD
        return Record.model_validate_json(path.read_text()) if path.is_file() else Record()

    def update_record(self, **sections: Any) -> Record:
        """Sets top-level entries (records or plain values) and rewrites record.json."""
        given = {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in sections.items()}
        record = Record.model_validate({**self.record().model_dump(), **given})
        self.path.mkdir(parents=True, exist_ok=True)
        (self / self.RECORD).write_text(record.model_dump_json(indent=2, exclude_none=True) + "\n")
        return record

    def student_meta(self) -> StudentMeta:
        return StudentMeta.model_validate_json((self / self.STUDENT_META).read_text())

    def write_student_meta(self, meta: StudentMeta) -> None:
        (self / self.STUDENT_META).write_text(meta.model_dump_json(indent=2))

    def teacher_meta(self) -> TeacherMeta:
        return TeacherMeta.model_validate_json((self / self.TEACHER_META).read_text())

    def write_teacher_meta(self, meta: TeacherMeta) -> None:
        (self / self.TEACHER_META).write_text(meta.model_dump_json(indent=2))

    def write_json(self, name: str, value: Any) -> None:
        (self / name).write_text(json.dumps(value, indent=2))
