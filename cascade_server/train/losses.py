"""Distillation losses, one module per method, all with the signature
`loss(student_logits, teacher_logits, targets, **extra)`: a new method is one class and one
registration, never an edit of the training loop. Formulas: ../shared/METHODS.md (reproduced in
docs/methods.md). Each is pinned by a golden-value test on tiny fixed inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Registry

LOSSES: Registry = Registry("loss")


def soft_cross_entropy(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """CE(q, u) = -sum_c q_c log softmax(u)_c, averaged over the batch."""
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


def tempered_kl(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """T^2 * KL(p_t^T || p_s^T), batch mean."""
    t = temperature
    return (t * t) * F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )


def label_smoothing(targets: torch.Tensor, num_classes: int, alpha: float) -> torch.Tensor:
    """(1 - alpha) e_y + alpha / L."""
    return (1 - alpha) * F.one_hot(targets, num_classes).float() + alpha / num_classes


def _mask(classes: Sequence[int], num_classes: int, device) -> torch.Tensor:
    m = torch.zeros(num_classes, dtype=torch.bool, device=device)
    m[torch.as_tensor(list(classes), dtype=torch.long, device=device)] = True
    return m


@LOSSES.register("ce")
class CrossEntropy(nn.Module):
    """Labels only: the no-teacher baseline (and how teachers are trained, optionally with label
    smoothing)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, student_logits, teacher_logits, targets, **_) -> torch.Tensor:
        return F.cross_entropy(student_logits, targets, label_smoothing=self.label_smoothing)


@LOSSES.register("kd")
class KnowledgeDistillation(nn.Module):
    """`a * CE(e_y, u_s) + b * T^2 * KL(p_t^T || p_s^T)` (Hinton et al.). The cascade paper's
    baseline is a = 0, b = 1: pure teacher matching."""

    def __init__(self, a: float = 0.0, b: float = 1.0, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        self.a, self.b, self.temperature = a, b, temperature

    def forward(self, student_logits, teacher_logits, targets, **_) -> torch.Tensor:
        loss = self.b * tempered_kl(student_logits, teacher_logits, self.temperature)
        if self.a:
            loss = loss + self.a * F.cross_entropy(student_logits, targets)
        return loss


@LOSSES.register("md")
class MarginDistillation(nn.Module):
    """Margin-based distillation (reconstruction; METHODS.md marks the details unsure).
    Items whose teacher margin exceeds `rho_train` are easy: target p_t. Hard items: target
    `a * LS_alpha(e_y) + b * p_t`, renormalised, so the student learns a low margin there and
    delegates. `teacher_logits` should be held-out (cross-fitted or augmented-view) logits: a
    teacher scored on its own training data is over-confident and MD collapses to KD."""

    def __init__(
        self, a: float = 0.5, b: float = 0.5, alpha: float = 0.6, rho_train: float = 0.4
    ) -> None:
        super().__init__()
        if a < 0 or b < 0 or a + b <= 0:
            raise ValueError("a and b must be non-negative and not both zero")
        self.a, self.b, self.alpha, self.rho_train = a, b, alpha, rho_train

    def targets(self, teacher_logits, targets) -> torch.Tensor:
        p_t = F.softmax(teacher_logits, dim=1)
        top2 = p_t.topk(2, dim=1).values
        easy = (top2[:, 0] - top2[:, 1]) > self.rho_train
        hard_target = self.a * label_smoothing(targets, p_t.shape[1], self.alpha) + self.b * p_t
        hard_target = hard_target / (self.a + self.b)
        return torch.where(easy[:, None], p_t, hard_target)

    def forward(self, student_logits, teacher_logits, targets, **_) -> torch.Tensor:
        return soft_cross_entropy(self.targets(teacher_logits, targets), student_logits)


class _ClassSpecific(nn.Module):
    """Shared by CD-I/II/III: the in-domain class set L_in."""

    def __init__(self, in_domain: Sequence[int], alpha: float = 0.4) -> None:
        super().__init__()
        if not in_domain:
            raise ValueError("the in-domain class set is empty")
        self.in_domain = sorted(int(c) for c in in_domain)
        self.alpha = alpha

    def in_mask(self, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
        return _mask(self.in_domain, num_classes, targets.device)[targets]


@LOSSES.register("cd1")
class ClassSpecificI(_ClassSpecific):
    """CD-I: target p_t for in-domain items, label-smoothed one-hot for the others; the student
    learns to be confident only on L_in."""

    def forward(self, student_logits, teacher_logits, targets, **_) -> torch.Tensor:
        n_classes = teacher_logits.shape[1]
        inside = self.in_mask(targets, n_classes)
        target = torch.where(
            inside[:, None],
            F.softmax(teacher_logits, dim=1),
            label_smoothing(targets, n_classes, self.alpha),
        )
        return soft_cross_entropy(target, student_logits)


@LOSSES.register("cd2")
class ClassSpecificII(_ClassSpecific):
    """CD-II (unsure): in-domain items get the teacher restricted and renormalised to L_in;
    out-of-domain items a uniform target over all classes."""

    def forward(self, student_logits, teacher_logits, targets, **_) -> torch.Tensor:
        n_classes = teacher_logits.shape[1]
        keep = _mask(self.in_domain, n_classes, targets.device)
        restricted = F.softmax(teacher_logits.masked_fill(~keep, float("-inf")), dim=1)
        uniform = torch.full_like(restricted, 1.0 / n_classes)
        target = torch.where(self.in_mask(targets, n_classes)[:, None], restricted, uniform)
        return soft_cross_entropy(target, student_logits)


@LOSSES.register("cd3")
class ClassSpecificIII(_ClassSpecific):
    """CD-III: the student has |L_in| + 1 outputs (L_in in sorted order, then abstain).
    In-domain: the teacher's softmax over L_in only (abstain 0). Out-of-domain: abstain."""

    def forward(self, student_logits, teacher_logits, targets, **_) -> torch.Tensor:
        n_classes = teacher_logits.shape[1]
        k = len(self.in_domain)
        if student_logits.shape[1] != k + 1:
            raise ValueError(f"cd3 needs a student with {k + 1} outputs")
        idx = torch.as_tensor(self.in_domain, device=teacher_logits.device)
        inside = F.softmax(teacher_logits[:, idx], dim=1)
        target = torch.cat([inside, torch.zeros_like(inside[:, :1])], dim=1)
        abstain = torch.zeros_like(target)
        abstain[:, k] = 1.0
        target = torch.where(self.in_mask(targets, n_classes)[:, None], target, abstain)
        return soft_cross_entropy(target, student_logits)


@LOSSES.register("kdplus")
class KDPlus(nn.Module):
    """KD+: `w_ce CE(y, u_s(x)) + w_kd T^2 KL(p_t^T(x) || p_s^T(x))
    + w_mix T^2 KL(p_t^T(x~) || p_s^T(x~))`; x~ are interpolated inputs that the teacher labels
    itself (no label mixing). The mixed logits come in as `student_mix_logits` and
    `teacher_mix_logits`."""

    def __init__(
        self, w_ce: float = 1.0, w_kd: float = 1.0, w_mix: float = 1.0, temperature: float = 4.0
    ) -> None:
        super().__init__()
        self.w_ce, self.w_kd, self.w_mix, self.temperature = w_ce, w_kd, w_mix, temperature

    def forward(
        self,
        student_logits,
        teacher_logits,
        targets,
        *,
        student_mix_logits=None,
        teacher_mix_logits=None,
        **_,
    ) -> torch.Tensor:
        t = self.temperature
        loss = self.w_ce * F.cross_entropy(student_logits, targets)
        loss = loss + self.w_kd * tempered_kl(student_logits, teacher_logits, t)
        if student_mix_logits is not None:
            loss = loss + self.w_mix * tempered_kl(student_mix_logits, teacher_mix_logits, t)
        return loss


@LOSSES.register("disk")
class ScaffoldedLoss(nn.Module):
    """DiSK (Kag et al., ICLR 2023). With M = TopK(u_t) + {y} and t~ the teacher's softmax at
    T_t over M (zero elsewhere):
    L_scaf = w_nll T_s T_t mean_i sum_{c in M} -t~_c log(s_c(x_i) + g(x_i)), s = softmax(u_s/T_s).
    Student step: L_S = w_aux CE(y, u_s) + L_scaf. Guide step: L_G = L_scaf
    + lambda relu(sum_i g_i min(CE(u_s(x_i), argmax u_t), max_ce) / n_err - delta)
    + w_nll mean_i log(1 + K g_i)."""

    def __init__(
        self,
        top_k: int = 10,
        t_teacher: float = 4.0,
        t_student: float = 3.5,
        w_aux: float = 0.1,
        w_nll: float = 0.9,
        max_ce: float = 5.0,
    ) -> None:
        super().__init__()
        self.top_k, self.t_teacher, self.t_student = top_k, t_teacher, t_student
        self.w_aux, self.w_nll, self.max_ce = w_aux, w_nll, max_ce

    def teacher_target(self, teacher_logits, targets) -> torch.Tensor:
        k = min(self.top_k, teacher_logits.shape[1])
        mask = torch.zeros_like(teacher_logits, dtype=torch.bool)
        mask.scatter_(1, teacher_logits.topk(k, dim=1).indices, True)
        mask.scatter_(1, targets[:, None], True)
        return F.softmax((teacher_logits / self.t_teacher).masked_fill(~mask, float("-inf")), 1)

    def scaffold(self, student_logits, teacher_logits, targets, guide) -> torch.Tensor:
        t_tilde = self.teacher_target(teacher_logits, targets)
        s = F.softmax(student_logits / self.t_student, dim=1)
        nll = -(t_tilde * torch.log(s + guide[:, None])).sum(1)
        return self.w_nll * self.t_student * self.t_teacher * nll.mean()

    def forward(self, student_logits, teacher_logits, targets, *, guide, **_) -> torch.Tensor:
        """The student's step (guide frozen)."""
        return self.w_aux * F.cross_entropy(student_logits, targets) + self.scaffold(
            student_logits, teacher_logits, targets, guide
        )

    def guide_loss(
        self, student_logits, teacher_logits, targets, guide, lam: float, delta: float
    ) -> torch.Tensor:
        """The guide's step (student frozen): help where the student errs, within budget."""
        k = min(self.top_k, teacher_logits.shape[1])
        scaf = self.scaffold(student_logits, teacher_logits, targets, guide)
        ce = F.cross_entropy(student_logits, teacher_logits.argmax(1), reduction="none")
        n_err = max(int((student_logits.argmax(1) != targets).sum()), 1)
        budget = F.relu((guide * ce.clamp(max=self.max_ce)).sum() / n_err - delta)
        return scaf + lam * budget + self.w_nll * torch.log1p(k * guide).mean()


@LOSSES.register("bdistil")
class WeightedResidual(nn.Module):
    """B-DISTIL member step (reconstruction, METHODS.md marks the algorithm unsure): fit the
    member's logits f to the residual r = g - F_{t-1} under per-(example, class) weights w from
    an exponential loss on the residual: mean(w * (f - r)^2) with w = exp(beta |r| / mean|r|),
    normalised to mean 1. Scaling by mean|r| keeps the weights bounded whatever the logits'
    scale (raw exp(|r|) on logits of magnitude 20 lets a handful of entries take all weight)."""

    def __init__(self, beta: float = 0.5) -> None:
        super().__init__()
        self.beta = beta

    def weights(self, residual: torch.Tensor) -> torch.Tensor:
        scale = residual.abs().mean().clamp_min(1e-6)
        w = torch.exp(self.beta * residual.abs() / scale)
        return w / w.mean()

    def forward(self, student_logits, teacher_logits, targets, *, residual, **_) -> torch.Tensor:
        w = self.weights(residual)
        return (w * (student_logits - residual) ** 2).mean()
