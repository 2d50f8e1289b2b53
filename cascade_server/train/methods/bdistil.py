"""B-DISTIL (reconstruction): boosting small members toward the teacher's logits, an anytime
ensemble that answers after each member."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import torch
from torch import nn

from ..device import chunked, device_of, to_device
from ..engine import Batch, fit
from ..losses import WeightedResidual
from ..models import Classifier, build
from .base import METHODS, Context, StudentResult

log = logging.getLogger(__name__)


class Ensemble(nn.Module):
    """B-DISTIL's anytime ensemble: F_k = sum_{j<=k} eta_j f_j. `forward` returns F_T;
    `stages` every F_k. With `connect`, member k's head also reads member k-1's features."""

    etas: torch.Tensor

    def __init__(self, members: list[Classifier], etas: list[float], connect: bool) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("etas", torch.tensor(etas, dtype=torch.float32))
        self.connect = connect

    def member(self, k: int) -> Classifier:
        return cast(Classifier, self.members[k])

    def member_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs: list[torch.Tensor] = []
        prev = None
        for m in map(self.member, range(len(self.members))):
            feat = m.features(x)
            head_in = (
                torch.cat([feat, prev], dim=1) if (self.connect and prev is not None) else feat
            )
            outs.append(m.head(head_in))
            prev = feat.detach()
        return outs

    def last_member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """f_T alone (training of the newest member): earlier members only lend features."""
        last = self.member(-1)
        feat = last.features(x)
        if self.connect and len(self.members) > 1:
            with torch.no_grad():
                prev = self.member(-2).features(x)
            feat = torch.cat([feat, prev], dim=1)
        return last.head(feat)

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        total: torch.Tensor | float = 0.0
        out: list[torch.Tensor] = []
        for eta, f in zip(self.etas, self.member_logits(x), strict=True):
            step = total + eta * f
            out.append(step)
            total = step
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)[-1]


def new_member(
    arch: str, in_shape, outputs: int, kwargs: dict, prev_dim: int, connect: bool
) -> Classifier:
    """Member k; with `connect`, its head also reads member k-1's `prev_dim` features."""
    member = build(arch, in_shape, outputs, **kwargs)
    if connect and prev_dim:
        member.head = nn.Linear(member.feature_dim + prev_dim, outputs)
    return member


def build_ensemble(
    arch: str, in_shape, outputs: int, kwargs: dict, members: int, connect: bool
) -> Ensemble:
    """An untrained ensemble of the shape B-DISTIL trains, for loading its saved weights (the
    etas are a buffer: they come with the weights)."""
    built: list[Classifier] = []
    for _ in range(members):
        prev_dim = built[-1].feature_dim if built else 0
        built.append(new_member(arch, in_shape, outputs, kwargs, prev_dim, connect))
    return Ensemble(built, [1.0] * members, connect)


class StagedOutputs(nn.Module):
    """For export: `logits` (F_T) then `stage_1` .. `stage_T`."""

    def __init__(self, ensemble: Ensemble) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor):
        stages = self.ensemble.stages(x)
        return (stages[-1], *stages)


@METHODS.register("bdistil")
class BDistil:
    summary = (
        "B-DISTIL (reconstruction): boosting T small members toward the teacher's logits; "
        "anytime prediction after each member"
    )
    needs_teacher = True

    @dataclass
    class Params:
        members: int = 3
        beta: float = 0.5  # exponential weights on the (scaled) residual
        connect: bool = False  # member k's head also reads member k-1's features
        member_kwargs: dict = field(default_factory=dict)  # overrides of the student kwargs

    def train(self, ctx: Context, params) -> StudentResult:
        if params.members < 1:
            raise ValueError("members must be at least 1")
        # Logits are shift-invariant: centring each row removes scale the members need not fit.
        g = ctx.train_logits()
        g = g - g.mean(axis=1, keepdims=True)
        weigher = WeightedResidual(params.beta)
        members: list[Classifier] = []
        etas: list[float] = []
        history: list[float] = []
        current = np.zeros_like(g)
        kwargs = {**ctx.student_kwargs, **params.member_kwargs}
        prev_dim = 0
        for t in range(params.members):
            member = new_member(
                ctx.student_arch, ctx.in_shape, ctx.num_classes, kwargs, prev_dim, params.connect
            )
            residual = to_device(g - current, ctx.fit.device)
            ensemble = Ensemble([*members, member], [*etas, 1.0], params.connect)
            for m in members:  # earlier members stay fixed
                m.requires_grad_(False)

            def step(model: nn.Module, b: Batch, ens=ensemble, r=residual, fixed=tuple(members)):
                for m in fixed:  # keep their BatchNorm statistics as they were
                    m.eval()
                f_t = ens.last_member_logits(b.x)
                return weigher(f_t, None, b.y, residual=r[b.idx]), None

            fit_cfg = dataclasses.replace(ctx.fit, seed=ctx.fit.seed + t)
            history += fit(
                ensemble,
                step,
                ctx.x_train,
                ctx.y_train,
                fit_cfg,
                desc=f"bdistil member {t + 1}/{params.members}",
                parameters=member.parameters(),
            )
            with torch.no_grad():
                ensemble.eval()
                f = chunked(ensemble.last_member_logits, ctx.x_train, device_of(ensemble))
            eta = line_search(f, g - current, weigher)
            members.append(member)
            etas.append(eta)
            current = current + eta * f
            prev_dim = member.feature_dim
            log.info(
                "bdistil member %d: eta %.3f, agreement with teacher %.3f",
                t + 1,
                eta,
                float((current.argmax(1) == g.argmax(1)).mean()),
            )
        model = Ensemble(members, etas, params.connect).eval()
        model.requires_grad_(True)
        return StudentResult(model, history, stages=params.members)


def line_search(f: np.ndarray, residual: np.ndarray, weigher: WeightedResidual) -> float:
    """eta minimising sum w (eta f - r)^2, in closed form (w from the residual)."""
    w = weigher.weights(torch.from_numpy(residual)).numpy()
    denom = float((w * f * f).sum())
    return float((w * f * residual).sum() / denom) if denom > 0 else 0.0
