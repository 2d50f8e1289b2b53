"""B-DISTIL served as stages (`export.anytime: tiers`): member 1 of the anytime ensemble is the
bundle's student (logits eta_1 f_1(x)); each later member k is a tier `member_k` whose graph
takes the previous stage's logits and adds its own, F_k = prev_logits + eta_k f_k(x), so that
an item reaching stage k pays for one member, not k. Every threshold comes from the frontier of
the stage logits on the validation split (frontier.py).

With `connect`, member k's head also reads member k-1's features: the tier's graph recomputes
them (the gateway hands a tier the previous logits, not activations), and its cost counts them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...bundle import Calibration, Frontier, TierRef
from ..methods import Ensemble
from ..models import count_macs
from ..records import RunDir
from ..to_onnx import export_onnx
from .calibrate import student_calibration
from .distill import Pair, pair_logits
from .frontier import choose_row, frontier, pass_rates
from .prepare import Prepared

PREV_INPUT = "prev_logits"


class MemberLogits(nn.Module):
    """eta_k f_k(x), member k alone (0-based), with member k-1's features when connected."""

    eta: torch.Tensor

    def __init__(self, ensemble: Ensemble, k: int) -> None:
        super().__init__()
        self.member = ensemble.member(k)
        self.previous = ensemble.member(k - 1) if ensemble.connect and k > 0 else None
        self.register_buffer("eta", ensemble.etas[k].detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.member.features(x)
        if self.previous is not None:
            feat = torch.cat([feat, self.previous.features(x)], dim=1)
        out: torch.Tensor = self.eta * self.member.head(feat)
        return out


class MemberStep(nn.Module):
    """A later member as a tier: (x, prev_logits) -> prev_logits + eta_k f_k(x)."""

    def __init__(self, member: MemberLogits) -> None:
        super().__init__()
        self.member = member

    def forward(self, x: torch.Tensor, prev_logits: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = prev_logits + self.member(x)
        return out


def member_costs(ensemble: Ensemble, prep: Prepared, teacher_macs: int | None) -> list[float]:
    """Each member's cost per item relative to the teacher (MACs; a connected member counts
    the features of the one before it, which its graph recomputes). 0 when the teacher's MACs
    are unknown (an ONNX teacher), as `Record.cost_ratio` has it."""
    if not teacher_macs:
        return [0.0] * len(ensemble.members)
    return [
        count_macs(MemberLogits(ensemble, k), prep.in_shape, prep.modality) / teacher_macs
        for k in range(len(ensemble.members))
    ]


def tier_name(k: int) -> str:
    """Stage k (0-based) of the ensemble as a tier (k >= 1)."""
    return f"member_{k + 1}"


@dataclass(frozen=True)
class TierPlan:
    """What the manifest says about the stages: the student's calibration (member 1 against
    the teacher, at the frontier row's first threshold), the tiers and the frontier."""

    calibration: Calibration
    tiers: tuple[TierRef, ...]
    frontier: Frontier
    costs: list[float]


def plan_tiers(prep: Prepared, run: RunDir, pair: Pair, ensemble: Ensemble) -> TierPlan:
    """The frontier of the stage logits on the validation split and the row for the
    calibration config's target: the cheapest reaching `target_accuracy` when set, else the
    most accurate whose teacher share is within `target_delegation_rate`."""
    record = run.record()
    logits = pair_logits(prep, run, "val", pair)
    assert logits.stages is not None
    costs = member_costs(ensemble, prep, record.teacher.macs if record.teacher else None)
    labels = prep.y["val"]
    front = frontier(
        logits.stages, logits.teacher, labels, costs, split="val", policy=logits.policy
    )
    target = prep.config.calibration
    if target.target_accuracy is not None:
        row = choose_row(front, target_accuracy=target.target_accuracy)
    else:
        row = choose_row(front, teacher_rate=target.target_delegation_rate)
    passing = pass_rates(row)
    tiers = tuple(
        TierRef(
            name=tier_name(k),
            runtime="onnx",
            file=f"{tier_name(k)}.onnx",
            input_name="input",
            output="logits",
            prev_input=PREV_INPUT,
            threshold=row.thresholds[k],
            cost=costs[k],
            pass_rate=passing[k],
        )
        for k in range(1, len(costs))
    )
    calibration = student_calibration(
        logits.stages[0], logits.teacher, labels, row, cost_student=costs[0], policy=logits.policy
    )
    return TierPlan(calibration, tiers, front, costs)


def write_members(ensemble: Ensemble, prep: Prepared, bundle_dir: Path, student_file: str) -> None:
    """Member 1 as the student's graph, each later member as its tier's graph."""
    outputs = int(ensemble.member(0).head.out_features)
    export_onnx(
        MemberLogits(ensemble, 0), prep.in_shape, bundle_dir / student_file, modality=prep.modality
    )
    for k in range(1, len(ensemble.members)):
        export_onnx(
            MemberStep(MemberLogits(ensemble, k)),
            prep.in_shape,
            bundle_dir / f"{tier_name(k)}.onnx",
            modality=prep.modality,
            extra_inputs=[(PREV_INPUT, outputs)],
        )


def chain(sessions: list, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The stages' logits of an exported chain (student first), each tier fed the previous
    stage's logits: what the gateway computes, for checks and tests."""
    out: list[np.ndarray] = []
    for k, session in enumerate(sessions):
        extra = {PREV_INPUT: out[-1].astype(np.float32)} if k else {}
        out.append(session.run(["logits"], {**feeds, **extra})[0])
    return out
