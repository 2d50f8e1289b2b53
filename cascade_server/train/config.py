"""One experiment = one YAML file, loaded with yaml.safe_load into this typed config. A file may
`extends: base.yaml` (a path relative to it): its sections are merged over the base's, key by
key, except `params` mappings, which replace the base's whole (their keys belong to one
architecture or method). CLI `--set section.key=value` overrides (OmegaConf's dotlist syntax)
come last."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf
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


class Recipe(_Section):
    """How a model is trained; the teacher and the students each have one (defaults: AdamW with
    a one-cycle schedule, no augmentation, which suits the small demos). The published CIFAR
    ResNet recipe (He et al. 2016) is `optimizer: sgd, momentum: 0.9, lr: 0.1, weight_decay:
    5e-4, schedule: cosine, warmup_epochs: 5, crop_padding: 4, hflip: true` (0.05 with batch 64)."""

    epochs: int = Field(default=30, gt=0)
    lr: float = 3e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(default=0.9, ge=0, lt=1)  # sgd (Nesterov)
    schedule: Literal["onecycle", "cosine"] = "onecycle"
    warmup_epochs: float = Field(default=0.0, ge=0)  # cosine: linear warm-up first
    # Image augmentation, per batch on the device: a random crop of the image zero-padded by
    # this many pixels, and horizontal flips (off for digits and text: a flipped 3 is no 3).
    crop_padding: int = Field(default=0, ge=0)
    hflip: bool = False
    # CUDA only (ignored on CPU): bf16 autocast, channels_last memory for 4-D inputs.
    amp: bool = True
    channels_last: bool = True


class TeacherConfig(Recipe):
    arch: str = "cnn"
    params: dict[str, Any] = Field(default_factory=dict)
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    # Import instead of training: a state-dict checkpoint of `arch`, or an ONNX classifier.
    checkpoint: Path | None = None
    onnx: Path | None = None


class StudentConfig(_Section):
    arch: str = "mlp"
    params: dict[str, Any] = Field(default_factory=dict)


class MethodConfig(_Section):
    name: str = "kd"
    params: dict[str, Any] = Field(default_factory=dict)


class FitSection(Recipe):
    """The students' recipe."""


class CalibrationConfig(_Section):
    target_delegation_rate: float = Field(default=0.2, ge=0, le=1)
    # When set, the threshold is the cheapest one reaching this accuracy instead.
    target_accuracy: float | None = Field(default=None, gt=0, le=1)


class ExportConfig(_Section):
    name: str = "digits"  # the cascade's name (manifest, metrics label)
    version: str | None = None  # default: <name>-<method>-<data fingerprint>-s<seed>
    teacher_name: str | None = None  # Triton model name; default <name>_teacher
    max_batch_size: int = 64
    # Anytime students (B-DISTIL): `tiers` serves member 1 as the student and each later member
    # as a tier of an N-stage cascade (its graph adds its logits to the previous stage's);
    # `graph` exports the whole ensemble as one graph with every stage as an output.
    anytime: Literal["tiers", "graph"] = "tiers"


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


def _read(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: an experiment is a YAML mapping")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    base_path = (path.parent / str(base)).resolve()
    if base_path in seen:
        raise ValueError(f"{path}: `extends` loops back to {base_path}")
    return merge(_read(base_path, (*seen, path.resolve())), raw)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on `base`, section by section; `params` mappings are replaced, not merged."""
    out = dict(base)
    for key, value in over.items():
        if key != "params" and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _overridden(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    if not overrides:
        return raw
    bad = [item for item in overrides if "=" not in item or item.startswith("=")]
    if bad:
        raise ValueError(f"--set takes section.key=value, got {bad[0]!r}")
    merged = OmegaConf.merge(OmegaConf.create(raw), OmegaConf.from_dotlist(list(overrides)))
    out = OmegaConf.to_container(merged)
    assert isinstance(out, dict)
    return {str(k): v for k, v in out.items()}


def load_config(path: Path | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    raw = _read(Path(path)) if path is not None else {}
    return ExperimentConfig.model_validate(_overridden(raw, overrides))


def override(config: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
    """`config` with `section.key=value` overrides applied (validated again)."""
    return ExperimentConfig.model_validate(_overridden(config.model_dump(mode="json"), overrides))


def dump_config(config: ExperimentConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
