"""Distillation losses. One signature for all: `loss(student_logits, teacher_logits, targets)`,
so a new method is one class and one registration, never an edit of the training loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Registry

LOSSES: Registry = Registry("method")


@LOSSES.register("ce")
class CrossEntropy(nn.Module):
    """Labels only: the no-teacher baseline (and how teachers are trained)."""

    uses_teacher = False

    def forward(self, student_logits, teacher_logits, targets) -> torch.Tensor:
        return F.cross_entropy(student_logits, targets)


@LOSSES.register("kd")
class KnowledgeDistillation(nn.Module):
    """`a * CE(y, u_s) + b * T^2 * KL(p_t^T || p_s^T)` (Hinton et al.). The cascade paper's
    baseline is a = 0, b = 1: pure teacher matching."""

    uses_teacher = True

    def __init__(self, a: float = 0.0, b: float = 1.0, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        self.a, self.b, self.temperature = a, b, temperature

    def forward(self, student_logits, teacher_logits, targets) -> torch.Tensor:
        t = self.temperature
        kl = F.kl_div(
            F.log_softmax(student_logits / t, dim=1),
            F.log_softmax(teacher_logits / t, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        loss = self.b * t * t * kl
        if self.a:
            loss = loss + self.a * F.cross_entropy(student_logits, targets)
        return loss
