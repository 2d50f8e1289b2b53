"""One experiment = one YAML file, loaded with yaml.safe_load into this typed config. CLI
`--set section.key=value` overrides run-specific values."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    name: str = "digits"
    params: dict[str, Any] = Field(default_factory=dict)
    # When set, the test split is this separate set (params updated with these), e.g.
    # {"split": "test"} for IDX files; else it is carved from `params`' data.
    test_params: dict[str, Any] | None = None


class SplitConfig(_Section):
    val: float = Field(default=0.2, gt=0, lt=1)
    test: float = Field(default=0.2, gt=0, lt=1)


class PreprocessConfig(_Section):
    # Per channel, on pixel/255. None: measured on the training split.
    mean: list[float] | None = None
    std: list[float] | None = None


class TextConfig(_Section):
    """Text datasets: the tokenizer trained on the training texts, and the sequence length."""

    vocab_size: int = Field(default=8000, gt=10)
    max_length: int = Field(default=32, gt=0, le=4096)
    model: Literal["wordpiece", "bpe"] = "wordpiece"
    lowercase: bool = True
    # An existing tokenizer.json instead of training one: required with an imported text
    # teacher, whose token ids only mean something under the tokenizer it was trained with.
    tokenizer: Path | None = None


class TeacherConfig(_Section):
    arch: str = "cnn"
    params: dict[str, Any] = Field(default_factory=dict)
    epochs: int = Field(default=30, gt=0)
    lr: float = 3e-3
    batch_size: int = 64
    # Import instead of training: a state-dict checkpoint of `arch`, or an ONNX classifier.
    checkpoint: Path | None = None
    onnx: Path | None = None


class StudentConfig(_Section):
    arch: str = "mlp"
    params: dict[str, Any] = Field(default_factory=dict)


class MethodConfig(_Section):
    name: str = "kd"
    params: dict[str, Any] = Field(default_factory=dict)


class FitSection(_Section):
    epochs: int = Field(default=30, gt=0)
    lr: float = 3e-3
    batch_size: int = 64
    weight_decay: float = 1e-4


class CalibrationConfig(_Section):
    target_delegation_rate: float = Field(default=0.2, ge=0, le=1)
    # When set, the threshold is the cheapest one reaching this accuracy instead.
    target_accuracy: float | None = Field(default=None, gt=0, le=1)


class ExportConfig(_Section):
    name: str = "digits"  # the cascade's name (manifest, metrics label)
    version: str | None = None  # default: <name>-<method>-<data fingerprint>-s<seed>
    teacher_name: str | None = None  # Triton model name; default <name>_teacher
    max_batch_size: int = 64


class ExperimentConfig(_Section):
    name: str = "experiment"
    seed: int = 0
    device: Literal["cpu", "cuda"] = "cpu"
    data: DataConfig = Field(default_factory=DataConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    fit: FitSection = Field(default_factory=FitSection)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)


def load_config(path: Path | None, overrides: list[str] = ()) -> ExperimentConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: an experiment is a YAML mapping")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes section.key=value, got {item!r}")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {part} is not a section")
        node[leaf] = yaml.safe_load(value)
    return ExperimentConfig.model_validate(raw)


def dump_config(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
