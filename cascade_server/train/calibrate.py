"""The threshold table: threshold -> delegation rate -> cascade accuracy -> expected cost,
measured on a held-out split with the same margin the gateway computes."""

from __future__ import annotations

import numpy as np

from ..bundle import Calibration, CalibrationRow
from ..policy import softmax, top2_margin


def calibrate(
    student_logits: np.ndarray,
    teacher_logits: np.ndarray,
    labels: np.ndarray,
    *,
    target_delegation_rate: float,
    cost_student: float,
    cost_teacher: float = 1.0,
    split: str = "val",
    steps: int = 100,
) -> Calibration:
    if not 0.0 <= target_delegation_rate <= 1.0:
        raise ValueError("target delegation rate must be within [0, 1]")
    margins = top2_margin(softmax(student_logits))
    student_ok = student_logits.argmax(1) == labels
    teacher_ok = teacher_logits.argmax(1) == labels
    rows = []
    for q in np.linspace(0.0, 1.0, steps + 1):
        # rho = the q-quantile of margins, so that P(margin < rho) ~= q; the ends are exact:
        # 0 delegates nothing, and past the largest margin everything.
        if q == 0.0:
            rho = 0.0
        elif q == 1.0:
            rho = 1.0
        else:
            rho = float(np.quantile(margins, q))
        delegate = margins < rho
        rate = float(delegate.mean())
        rows.append(
            CalibrationRow(
                threshold=rho,
                delegation_rate=rate,
                cascade_accuracy=float(np.where(delegate, teacher_ok, student_ok).mean()),
                expected_cost=cost_student + rate * cost_teacher,
            )
        )
    table = _monotone(rows)
    calibration = Calibration(
        split=split,
        n=len(labels),
        student_accuracy=float(student_ok.mean()),
        teacher_accuracy=float(teacher_ok.mean()),
        cost_student=cost_student,
        cost_teacher=cost_teacher,
        target_delegation_rate=target_delegation_rate,
        threshold=0.0,
        table=tuple(table),
    )
    threshold = calibration.threshold_for_rate(target_delegation_rate)
    return calibration.model_copy(update={"threshold": threshold})


def _monotone(rows: list[CalibrationRow]) -> list[CalibrationRow]:
    """Rows sorted by rate with strictly increasing rates (ties in margins collapse steps)."""
    out: list[CalibrationRow] = []
    for row in sorted(rows, key=lambda r: (r.delegation_rate, r.threshold)):
        if out and row.delegation_rate <= out[-1].delegation_rate:
            continue
        out.append(row)
    return out
