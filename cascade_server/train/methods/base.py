"""What every distillation method shares: the registry keyed by the names users type, the
training context a method receives, its result, and the loss-in-the-shared-loop base."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from ...registry import Registry
from ..engine import FitConfig, fit, seed_everything
from ..losses import LOSSES
from ..models import Classifier, build

METHODS: Registry = Registry("method")


@dataclass
class Context:
    x_train: np.ndarray  # float32, normalised
    y_train: np.ndarray
    in_shape: tuple[int, ...]
    num_classes: int
    teacher: Any | None  # TorchTeacher | OnnxTeacher
    student_arch: str
    student_kwargs: dict
    fit: FitConfig
    teacher_logits: np.ndarray | None = None  # on x_train, cached by the caller
    # Trains a fresh teacher on (x, y): for cross-fitted teacher logits (MD).
    retrain_teacher: Callable[[np.ndarray, np.ndarray, int], Any] | None = None
    checkpoint_dir: Any | None = None
    checkpoint_key: str = ""

    def build_student(self, outputs: int | None = None) -> Classifier:
        seed_everything(self.fit.seed)  # the same initial weights for the same config
        return build(
            self.student_arch, self.in_shape, outputs or self.num_classes, **self.student_kwargs
        )

    def require_teacher(self) -> Any:
        if self.teacher is None:
            raise ValueError("this method distils from a teacher: the run has none")
        return self.teacher

    def train_logits(self) -> np.ndarray:
        if self.teacher_logits is None:
            self.teacher_logits = self.require_teacher().logits(self.x_train)
        return self.teacher_logits

    def checkpoint(self, name: str):
        return self.checkpoint_dir / f"{name}.ckpt" if self.checkpoint_dir else None


@dataclass
class StudentResult:
    model: nn.Module  # forward(x) -> logits of the (last stage of the) student
    history: list[float]
    output_classes: list[int] | None = None  # class id per output; -1 = abstain
    abstain_output: int | None = None
    in_domain_classes: list[int] | None = None  # class-based delegation
    stages: int = 1  # B-DISTIL: cumulative stage outputs


def params_for(method: str, overrides: dict[str, Any] | None = None):
    """The method's Params with `overrides` (unknown keys raise, listing the valid ones)."""
    cls = METHODS.get(method).Params
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides or {}) - names)
    if unknown:
        raise ValueError(f"{method} has no parameter {unknown}; it takes: {sorted(names)}")
    return cls(**(overrides or {}))


def describe_methods() -> str:
    lines = []
    for name in METHODS.names():
        m = METHODS.get(name)
        knobs = ", ".join(f"{f.name}={_default(f)}" for f in dataclasses.fields(m.Params))
        lines.append(f"{name:8s} {m.summary}\n         {knobs or '(no parameters)'}")
    return "\n".join(lines)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "?"


class LossMethod:
    """A loss in the shared loop on fixed inputs with cached teacher logits."""

    loss_name = ""
    needs_teacher = True

    def loss(self, ctx: Context, params) -> nn.Module:
        return LOSSES.get(self.loss_name)(**dataclasses.asdict(params))

    def teacher_targets(self, ctx: Context, params) -> np.ndarray | None:
        return ctx.train_logits() if self.needs_teacher else None

    def train(self, ctx: Context, params) -> StudentResult:
        student = ctx.build_student()
        history = fit(
            student,
            self.loss(ctx, params),
            ctx.x_train,
            ctx.y_train,
            ctx.fit,
            teacher_logits=self.teacher_targets(ctx, params),
            desc=f"student ({self.loss_name})",
            checkpoint=ctx.checkpoint("student"),
            key=ctx.checkpoint_key,
        )
        return StudentResult(student, history)
