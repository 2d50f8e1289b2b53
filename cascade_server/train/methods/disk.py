"""DiSK: a training-only guide g(x) scaffolds the student on the items it cannot learn."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..device import chunked
from ..engine import Batch, Trainer, seed_everything
from ..losses import ScaffoldedLoss
from .base import METHODS, Context, StudentResult


class Guide(nn.Module):
    """DiSK's training-only guide g(x) in (0, 1): a small MLP on teacher logits or features."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(z)).squeeze(1)


def disk_lambda(epoch: int, lo: float, hi: float, period: int) -> float:
    """Cycles up from `lo` to `hi` (cosine) every `period` epochs."""
    phase = (epoch % period) / period
    return lo + (hi - lo) * (1 - math.cos(math.pi * phase)) / 2


def disk_delta(epoch: int, start: float, decay: float, floor: float, period: int) -> float:
    """Cycles down from start*decay^k to `floor` within the k-th period."""
    k, phase = divmod(epoch, period)
    top = max(start * decay**k, floor)
    return floor + (top - floor) * (1 + math.cos(math.pi * phase / period)) / 2


@METHODS.register("disk")
class DiSK:
    summary = "DiSK: a training-only guide scaffolds the student on what it cannot learn"
    needs_teacher = True

    @dataclass
    class Params:
        top_k: int = 10
        t_teacher: float = 4.0
        t_student: float = 3.5
        w_aux: float = 0.1
        w_nll: float = 0.9
        max_ce: float = 5.0
        lambda_min: float = 1.0
        lambda_max: float = 5.0
        lambda_period: int = 50
        delta_start: float = 0.6
        delta_decay: float = 0.9
        delta_min: float = 0.4
        delta_period: int = 20
        guide_warmup: int = 2  # epochs of guide-only training first
        student_passes: int = 3  # kt
        guide_passes: int = 3  # kg
        guide_input: str = "logits"  # or "features" (PyTorch teachers)
        guide_hidden: int = 64
        guide_lr: float = 1e-3

    def train(self, ctx: Context, params) -> StudentResult:
        p = params
        loss = ScaffoldedLoss(p.top_k, p.t_teacher, p.t_student, p.w_aux, p.w_nll, p.max_ce)
        t_logits = torch.from_numpy(ctx.train_logits())
        device = torch.device(ctx.fit.device)
        if p.guide_input == "features":
            teacher_device = getattr(ctx.teacher, "device", "cpu")
            z = torch.from_numpy(
                chunked(ctx.require_teacher().features, ctx.x_train, teacher_device)
            )
        elif p.guide_input == "logits":
            z = t_logits
        else:
            raise ValueError("guide_input must be logits or features")
        z = z.to(device)  # the guide trains on the student's device; batches index it there
        student = ctx.build_student()
        seed_everything(ctx.fit.seed)
        guide = Guide(z.shape[1], p.guide_hidden)
        epochs = ctx.fit.epochs
        state = {"lam": p.lambda_min, "delta": p.delta_start}

        def student_step(model: nn.Module, b: Batch):
            with torch.no_grad():
                g = guide(z[b.idx])
            logits = model(b.x)
            return loss(logits, b.t, b.y, guide=g), logits

        def guide_step(model: nn.Module, b: Batch):
            with torch.no_grad():
                s_logits = student(b.x)
            g = model(z[b.idx])
            return loss.guide_loss(s_logits, b.t, b.y, g, state["lam"], state["delta"]), None

        gen = torch.Generator().manual_seed(ctx.fit.seed)
        s_trainer = Trainer(
            student,
            student_step,
            ctx.x_train,
            ctx.y_train,
            ctx.fit,
            teacher_logits=t_logits.numpy(),
            epochs=epochs * p.student_passes,
            generator=gen,
        )
        g_fit = dataclasses.replace(ctx.fit, lr=p.guide_lr)
        g_trainer = Trainer(
            guide,
            guide_step,
            ctx.x_train,
            ctx.y_train,
            g_fit,
            teacher_logits=t_logits.numpy(),
            epochs=p.guide_warmup + epochs * p.guide_passes,
            generator=gen,
        )
        for _ in range(p.guide_warmup):
            g_trainer.run_epoch()
        history = []
        bar = tqdm(range(epochs), desc="student (disk)", leave=False, disable=not ctx.fit.progress)
        for epoch in bar:
            state["lam"] = disk_lambda(epoch, p.lambda_min, p.lambda_max, p.lambda_period)
            state["delta"] = disk_delta(
                epoch, p.delta_start, p.delta_decay, p.delta_min, p.delta_period
            )
            losses = [s_trainer.run_epoch() for _ in range(p.student_passes)]
            for _ in range(p.guide_passes):
                g_trainer.run_epoch()
            history.append(losses[-1])
            with torch.no_grad():
                mean_g = float(guide(z).mean())
            bar.set_postfix(
                loss=f"{history[-1]:.4f}",
                acc=f"{s_trainer.last_accuracy:.3f}",
                guide=f"{mean_g:.3f}",
            )
        student.eval()
        return StudentResult(student, history)
