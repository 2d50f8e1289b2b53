"""Class-specific distillation CD-I/II/III: the student specialises on an in-domain class set
L_in and delegates (CD-I/II) or abstains (CD-III) on the rest."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..engine import fit
from ..losses import LOSSES
from .base import METHODS, Context, LossMethod, StudentResult


@dataclass
class CDParams:
    # The in-domain class set L_in: an explicit list of class ids, or the k most frequent
    # training classes (default: 30% of the classes, as 30 of CIFAR-100's 100).
    in_domain: list[int] | None = None
    top_k_classes: int | None = None
    alpha: float = 0.4
    # Delegate when the student's argmax is outside L_in (CD-I/II; CD-III abstains instead).
    class_delegation: bool = True


def in_domain_classes(ctx: Context, params: CDParams) -> list[int]:
    if params.in_domain:
        classes = sorted(int(c) for c in params.in_domain)
        if not all(0 <= c < ctx.num_classes for c in classes):
            raise ValueError(f"in_domain class ids must be within [0, {ctx.num_classes})")
        return classes
    k = params.top_k_classes or max(1, round(0.3 * ctx.num_classes))
    counts = np.bincount(ctx.y_train, minlength=ctx.num_classes)
    # Stable: ties go to the lower class id.
    return sorted(int(c) for c in np.argsort(-counts, kind="stable")[:k])


class CDMethod(LossMethod):
    Params = CDParams

    def train(self, ctx: Context, params: CDParams) -> StudentResult:
        classes = in_domain_classes(ctx, params)
        loss = LOSSES.get(self.loss_name)(in_domain=classes, alpha=params.alpha)
        student = ctx.build_student(self.outputs(ctx, classes))
        history = fit(
            student,
            loss,
            ctx.x_train,
            ctx.y_train,
            ctx.fit,
            teacher_logits=ctx.train_logits(),
            desc=f"student ({self.loss_name})",
            checkpoint=ctx.checkpoint("student"),
            key=ctx.checkpoint_key,
        )
        return self.result(student, history, classes, params)

    def outputs(self, ctx: Context, classes: list[int]) -> int:
        return ctx.num_classes

    def result(self, student, history, classes, params) -> StudentResult:
        return StudentResult(
            student, history, in_domain_classes=classes if params.class_delegation else None
        )


@METHODS.register("cd1")
class CD1(CDMethod):
    summary = "class-specific I: teacher targets on L_in, label-smoothed one-hot elsewhere"
    loss_name = "cd1"


@METHODS.register("cd2")
class CD2(CDMethod):
    summary = "class-specific II: teacher renormalised to L_in in-domain, uniform elsewhere"
    loss_name = "cd2"


@METHODS.register("cd3")
class CD3(CDMethod):
    summary = "class-specific III: |L_in|+1 outputs, out-of-domain items learn to abstain"
    loss_name = "cd3"

    def outputs(self, ctx: Context, classes: list[int]) -> int:
        return len(classes) + 1

    def result(self, student, history, classes, params) -> StudentResult:
        return StudentResult(
            student, history, output_classes=[*classes, -1], abstain_output=len(classes)
        )
