"""Logit distillation: the CE baseline, KD (Hinton et al.) and margin-based MD, each a loss in
the shared loop on cached teacher logits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from ..losses import LOSSES
from .base import METHODS, Context, LossMethod


@METHODS.register("ce")
class CE(LossMethod):
    summary = "labels only, no teacher (baseline)"
    loss_name = "ce"
    needs_teacher = False

    @dataclass
    class Params:
        pass


@METHODS.register("kd")
class KD(LossMethod):
    summary = "a CE(y) + b T^2 KL(teacher || student) (Hinton; the cascade paper uses a=0, b=1)"
    loss_name = "kd"

    @dataclass
    class Params:
        a: float = 0.0
        b: float = 1.0
        temperature: float = 4.0


@METHODS.register("md")
class MD(LossMethod):
    summary = (
        "margin-based: teacher targets on easy items, a*LS(y)+b*p_t on hard ones "
        "(teacher margin <= rho_train), from held-out teacher logits"
    )
    loss_name = "md"

    @dataclass
    class Params:
        a: float = 0.5
        b: float = 0.5
        alpha: float = 0.6
        rho_train: float = 0.4
        # Where the teacher logits that decide easy/hard come from. "augment": the teacher on a
        # shifted view (and optional Gaussian noise) of each item, which works with any teacher
        # (noise is off by default: a Fashion-MNIST CNN fell from 90% to 23% under noise 0.3,
        # while a 1-pixel shift costs it 2 points); "crossfit":
        # out-of-fold logits of `folds` teachers retrained without the item (costs `folds`
        # teacher trainings); "train": plain logits (over-confident: MD collapses to KD).
        teacher_logits: str = "augment"
        folds: int = 3
        noise: float = 0.0
        shift: int = 1
        token_dropout: float = 0.15  # texts: share of tokens removed from the view

    def loss(self, ctx: Context, params) -> nn.Module:
        p = params
        return LOSSES.get("md")(a=p.a, b=p.b, alpha=p.alpha, rho_train=p.rho_train)

    def teacher_targets(self, ctx: Context, params) -> np.ndarray:
        if params.teacher_logits == "train":
            return ctx.train_logits()
        if params.teacher_logits == "augment":
            return augmented_logits(
                ctx.require_teacher(),
                ctx.x_train,
                params.noise,
                params.shift,
                seed=ctx.fit.seed,
                token_dropout=params.token_dropout,
            )
        if params.teacher_logits == "crossfit":
            if ctx.retrain_teacher is None:
                raise ValueError("crossfit needs a teacher trained by cascade-train (not imported)")
            return crossfit_logits(ctx, params.folds)
        raise ValueError(
            f"teacher_logits must be augment, crossfit or train, not {params.teacher_logits!r}"
        )


def augmented_logits(
    teacher, x: np.ndarray, noise: float, shift: int, seed: int, token_dropout: float = 0.15
) -> np.ndarray:
    """Teacher logits on one perturbed view of each input: images shifted by up to `shift`
    pixels plus Gaussian noise of `noise` (normalised units); texts with a share
    `token_dropout` of their tokens removed."""
    rng = np.random.default_rng(seed)
    if np.issubdtype(x.dtype, np.integer):
        drop = (rng.random(x.shape) < token_dropout) & (x != 0)
        return teacher.logits(np.where(drop, 0, x))
    views = np.empty_like(x)
    for i in range(len(x)):
        dy, dx = rng.integers(-shift, shift + 1, size=2) if shift else (0, 0)
        views[i] = np.roll(x[i], (int(dy), int(dx)), axis=(-2, -1))
    views += rng.normal(0.0, noise, size=x.shape).astype(np.float32)
    return teacher.logits(views.astype(np.float32))


def crossfit_logits(ctx: Context, folds: int) -> np.ndarray:
    """Out-of-fold teacher logits: each item scored by a teacher that never saw it."""
    if ctx.retrain_teacher is None:
        raise ValueError("crossfit needs a teacher trained by cascade-train (not imported)")
    rng = np.random.default_rng(ctx.fit.seed)
    assignment = rng.integers(0, folds, size=len(ctx.y_train))
    out = np.zeros((len(ctx.y_train), ctx.num_classes), np.float32)
    for k in range(folds):
        held = assignment == k
        teacher = ctx.retrain_teacher(ctx.x_train[~held], ctx.y_train[~held], k)
        out[held] = teacher.logits(ctx.x_train[held])
    return out
