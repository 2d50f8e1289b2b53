"""KD+: KD on the data plus KD on interpolated inputs that the teacher labels online."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..engine import Batch, fit
from ..losses import KDPlus
from .base import METHODS, Context, StudentResult


@METHODS.register("kdplus")
class KDPlusMethod:
    summary = "KD+ : KD on the data plus KD on interpolated inputs, labelled online by the teacher"
    needs_teacher = True

    @dataclass
    class Params:
        w_ce: float = 1.0
        w_kd: float = 1.0
        w_mix: float = 1.0
        temperature: float = 4.0
        beta: float = 1.0  # lam ~ Beta(beta, beta)

    def train(self, ctx: Context, params) -> StudentResult:
        loss = KDPlus(params.w_ce, params.w_kd, params.w_mix, params.temperature)
        mixer = torch.distributions.Beta(params.beta, params.beta)
        teacher = ctx.require_teacher()

        student = ctx.build_student()

        def step(model: nn.Module, b: Batch):
            partner = torch.randperm(len(b.x))
            logits = model(b.x)
            if torch.is_floating_point(b.x):
                lam = mixer.sample((len(b.x),)).view(-1, *[1] * (b.x.dim() - 1))
                mixed = lam * b.x + (1 - lam) * b.x[partner]
                # The teacher labels the interpolated inputs themselves: online, never cached.
                teacher_mix = teacher.torch_logits(mixed)
                student_mix = model(mixed)
            else:
                student_mix, teacher_mix = _mix_text(student, teacher, b.x, partner, mixer)
            value = loss(
                logits, b.t, b.y, student_mix_logits=student_mix, teacher_mix_logits=teacher_mix
            )
            return value, logits

        history = fit(
            student,
            step,
            ctx.x_train,
            ctx.y_train,
            ctx.fit,
            teacher_logits=ctx.train_logits(),
            desc="student (kdplus)",
            checkpoint=ctx.checkpoint("student"),
            key=ctx.checkpoint_key,
        )
        return StudentResult(student, history)


def _mix_text(student, teacher, ids: torch.Tensor, partner: torch.Tensor, mixer):
    """KD+ for text: interpolate in embedding space. Each model mixes its own embeddings of
    the same pairs with the same lam (token ids cannot be interpolated), over the union of the
    two masks; the teacher labels the mixture online."""
    model = getattr(teacher, "model", None)
    if model is None or not hasattr(model, "forward_embedded"):
        raise ValueError("kdplus on text mixes in embedding space: it needs a PyTorch text teacher")
    lam = mixer.sample((len(ids),)).view(-1, 1, 1)
    mask = ids != 0
    mix_mask = mask | mask[partner]
    emb_s = student.body.embed(ids)
    student_mix = student.forward_embedded(lam * emb_s + (1 - lam) * emb_s[partner], mix_mask)
    with torch.no_grad():
        emb_t = model.body.embed(ids)
        teacher_mix = model.forward_embedded(lam * emb_t + (1 - lam) * emb_t[partner], mix_mask)
    return student_mix, teacher_mix
