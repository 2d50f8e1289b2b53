"""The threshold table: threshold -> delegation rate -> cascade accuracy -> expected cost,
measured on a held-out split with the gateway's own decision function (policy.decide)."""

from __future__ import annotations

import numpy as np

from ..bundle import Calibration, CalibrationRow, StudentStage
from ..policy import class_probabilities, decide


def student_predictions(
    student_logits: np.ndarray, num_classes: int, output_classes=None
) -> np.ndarray:
    """Class ids the student answers with (abstain outputs never win)."""
    probs = decide(student_logits, 0.0).probs
    return class_probabilities(probs, output_classes, num_classes).argmax(1)


def cascade_rows(
    student_logits: np.ndarray,
    teacher_logits: np.ndarray,
    labels: np.ndarray,
    *,
    cost_student: float,
    cost_teacher: float = 1.0,
    steps: int = 100,
    output_classes=None,
    abstain_output: int | None = None,
    in_domain_outputs=None,
) -> list[CalibrationRow]:
    """One row per quantile of the student's margins, rates strictly increasing."""
    policy = {"abstain_output": abstain_output, "in_domain_outputs": in_domain_outputs}
    base = decide(student_logits, 0.0, **policy)
    forced = base.delegate  # class-based delegation and non-finite rows: at any threshold
    margins = base.margins
    student_ok = (
        student_predictions(student_logits, teacher_logits.shape[1], output_classes) == labels
    )
    teacher_ok = teacher_logits.argmax(1) == labels
    free = margins[~forced] if (~forced).any() else np.array([0.0])
    rows = []
    for q in np.linspace(0.0, 1.0, steps + 1):
        # rho = the q-quantile of margins, so that P(margin < rho) ~= q; the ends are exact:
        # 0 delegates nothing (beyond class-based rules), 1 everything but certainties.
        rho = 0.0 if q == 0.0 else 1.0 if q == 1.0 else float(np.quantile(free, q))
        delegate = forced | (margins < rho)
        rate = float(delegate.mean())
        rows.append(
            CalibrationRow(
                threshold=rho,
                delegation_rate=rate,
                cascade_accuracy=float(np.where(delegate, teacher_ok, student_ok).mean()),
                expected_cost=cost_student + rate * cost_teacher,
            )
        )
    out: list[CalibrationRow] = []
    for row in sorted(rows, key=lambda r: (r.delegation_rate, r.threshold)):
        if not out or row.delegation_rate > out[-1].delegation_rate:
            out.append(row)
    return out


def calibrate(
    student_logits: np.ndarray,
    teacher_logits: np.ndarray,
    labels: np.ndarray,
    *,
    target_delegation_rate: float | None = 0.2,
    target_accuracy: float | None = None,
    cost_student: float,
    cost_teacher: float = 1.0,
    split: str = "val",
    steps: int = 100,
    output_classes=None,
    abstain_output: int | None = None,
    in_domain_outputs=None,
) -> Calibration:
    """The table, and the threshold for a target delegation rate or a target accuracy."""
    if target_delegation_rate is not None and not 0.0 <= target_delegation_rate <= 1.0:
        raise ValueError("target delegation rate must be within [0, 1]")
    rows = cascade_rows(
        student_logits,
        teacher_logits,
        labels,
        cost_student=cost_student,
        cost_teacher=cost_teacher,
        steps=steps,
        output_classes=output_classes,
        abstain_output=abstain_output,
        in_domain_outputs=in_domain_outputs,
    )
    n_classes = teacher_logits.shape[1]
    student_acc = float(
        (student_predictions(student_logits, n_classes, output_classes) == labels).mean()
    )
    calibration = Calibration(
        split=split,
        n=len(labels),
        student_accuracy=student_acc,
        teacher_accuracy=float((teacher_logits.argmax(1) == labels).mean()),
        cost_student=cost_student,
        cost_teacher=cost_teacher,
        target_delegation_rate=target_delegation_rate or 0.0,
        threshold=0.0,
        table=tuple(rows),
    )
    if target_accuracy is not None:
        threshold = calibration.threshold_for_accuracy(target_accuracy)
        rate = calibration.rate_for_threshold(threshold)
        return calibration.model_copy(
            update={"threshold": threshold, "target_delegation_rate": rate}
        )
    threshold = calibration.threshold_for_rate(target_delegation_rate)
    return calibration.model_copy(update={"threshold": threshold})


def calibrate_stages(
    stage_logits: list[np.ndarray], target_delegation_rate: float, names: list[str]
) -> list[StudentStage]:
    """Anytime students: an item stops at the first stage whose margin clears rho_k. Each stage
    passes on the same share r of what reaches it, r = q^(1/T), so that a fraction q reaches
    the teacher; rho_k is the r-quantile of stage k's margins among the items reaching it."""
    n_stages = len(stage_logits)
    rate = target_delegation_rate ** (1.0 / n_stages) if target_delegation_rate > 0 else 0.0
    reaching = np.ones(len(stage_logits[0]), dtype=bool)
    stages = []
    for logits, name in zip(stage_logits, names, strict=True):
        margins = decide(logits, 0.0).margins
        if reaching.any() and 0.0 < rate < 1.0:
            rho = float(np.quantile(margins[reaching], rate))
        else:
            rho = 0.0 if rate == 0.0 else 1.0
        moving_on = reaching & (margins < rho)
        share = float(moving_on.sum() / reaching.sum()) if reaching.any() else 0.0
        stages.append(StudentStage(output=name, threshold=rho, pass_rate=share))
        reaching = moving_on
    return stages
