"""Calibration: the threshold table (threshold -> delegation rate -> cascade accuracy ->
expected cost) measured on the held-out split (plus the captured items held back, for a student
distilled with capture) with the gateway's own decision function, the
threshold for a target delegation rate or accuracy, per-stage thresholds for anytime students;
and the `calibrate` stage that writes them into the run directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ...bundle import Calibration, CalibrationRow, FrontierRow, StudentStage
from ...policy import decide
from ..capture_data import Captured, load_holdout
from ..methods import Ensemble
from ..records import CalibrationSummary, OutputPolicy, RunDir
from .distill import Pair, PairLogits, pair_logits, stage_logits, student_logits
from .prepare import Prepared

PLAIN = OutputPolicy()


def cascade_rows(
    student_logits: np.ndarray,
    teacher_logits: np.ndarray,
    labels: np.ndarray,
    *,
    cost_student: float,
    cost_teacher: float = 1.0,
    steps: int = 100,
    policy: OutputPolicy = PLAIN,
) -> list[CalibrationRow]:
    """One row per quantile of the student's margins, rates strictly increasing."""
    base = policy.decide(student_logits, 0.0)
    forced = base.delegate  # class-based delegation and non-finite rows: at any threshold
    margins = base.margins
    student_pred = policy.predictions(student_logits, teacher_logits.shape[1])
    student_ok = student_pred == labels
    teacher_ok = teacher_logits.argmax(1) == labels
    agrees = student_pred == teacher_logits.argmax(1)
    free = margins[~forced] if (~forced).any() else np.array([0.0])
    rows = []
    for q in np.linspace(0.0, 1.0, steps + 1):
        # rho = the q-quantile of margins, so that P(margin < rho) ~= q; the ends are exact:
        # 0 delegates nothing (beyond class-based rules), 1 everything but certainties.
        rho = 0.0 if q == 0.0 else 1.0 if q == 1.0 else float(np.quantile(free, q))
        delegate = forced | (margins < rho)
        rate = float(delegate.mean())
        kept = ~delegate
        rows.append(
            CalibrationRow(
                threshold=rho,
                delegation_rate=rate,
                cascade_accuracy=float(np.where(delegate, teacher_ok, student_ok).mean()),
                expected_cost=cost_student + rate * cost_teacher,
                accepted=int(kept.sum()),
                accepted_errors=int((kept & ~student_ok).sum()),
                accepted_disagreements=int((kept & ~agrees).sum()),
            )
        )
    out: list[CalibrationRow] = []
    for row in sorted(rows, key=lambda r: (r.delegation_rate, r.threshold)):
        if not out or row.delegation_rate > out[-1].delegation_rate:
            out.append(row)
    return out


def calibrate_logits(
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
    policy: OutputPolicy = PLAIN,
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
        policy=policy,
    )
    n_classes = teacher_logits.shape[1]
    student_acc = float((policy.predictions(student_logits, n_classes) == labels).mean())
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
    if target_delegation_rate is None:
        raise ValueError("give a target delegation rate or a target accuracy")
    threshold = calibration.threshold_for_rate(target_delegation_rate)
    return calibration.model_copy(update={"threshold": threshold})


def student_calibration(
    student_logits: np.ndarray,
    teacher_logits: np.ndarray,
    labels: np.ndarray,
    row: FrontierRow,
    *,
    cost_student: float,
    policy: OutputPolicy = PLAIN,
    split: str = "val",
) -> Calibration:
    """An N-stage cascade's student (stage 0): its table against the teacher, as a two-stage
    bundle's, with the threshold of a frontier row; the target delegation rate is the share
    the student passes on at it (to the first tier), which the live control holds."""
    calibration = calibrate_logits(
        student_logits,
        teacher_logits,
        labels,
        target_delegation_rate=0.0,
        cost_student=cost_student,
        split=split,
        policy=policy,
    )
    return calibration.model_copy(
        update={"threshold": row.thresholds[0], "target_delegation_rate": 1.0 - row.answered[0]}
    )


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


def calibrate(
    prep: Prepared,
    run_dir: Path,
    *,
    target_delegation_rate: float | None = None,
    target_accuracy: float | None = None,
    pair: Pair | None = None,
) -> Calibration:
    """The stage: calibration.json and stages.json on the validation split. The config's target
    unless one is given. `pair`: the trained student and teacher in memory (`run`), else
    loaded from the run directory."""
    cfg = prep.config.calibration
    if target_delegation_rate is None and target_accuracy is None:
        target_delegation_rate, target_accuracy = cfg.target_delegation_rate, cfg.target_accuracy
    run = RunDir(run_dir)
    pair = pair or Pair.load(prep, run_dir)
    logits, labels, split = pair_logits(prep, run, "val", pair), prep.y["val"], "val"
    held = load_holdout(run_dir)
    if held is not None and len(held):  # distilled with capture: its held-back items too
        logits = with_captured(logits, held, pair)
        labels = np.concatenate([labels, held.labels])  # the teacher's answers
        split = "val+capture"
    calibration = calibrate_logits(
        logits.student,
        logits.teacher,
        labels,
        target_delegation_rate=target_delegation_rate if target_accuracy is None else None,
        target_accuracy=target_accuracy,
        cost_student=run.record().cost_ratio(),
        split=split,
        policy=logits.policy,
    )
    stages: list[StudentStage] = []
    if logits.stages is not None:
        names = [f"stage_{k + 1}" for k in range(len(logits.stages))]
        stages = calibrate_stages(logits.stages, calibration.target_delegation_rate, names)
    (run / RunDir.CALIBRATION).write_text(calibration.model_dump_json(indent=2))
    run.write_json(RunDir.STAGES, [s.model_dump() for s in stages])
    run.update_record(
        calibration=CalibrationSummary(
            threshold=calibration.threshold,
            target_delegation_rate=calibration.target_delegation_rate,
            val_student_accuracy=calibration.student_accuracy,
            val_teacher_accuracy=calibration.teacher_accuracy,
            stages=[s.model_dump() for s in stages],
        )
    )
    return calibration


def with_captured(logits: PairLogits, held: Captured, pair: Pair) -> PairLogits:
    """The split's logits followed by the held-back captured items': the student's computed
    here, the teacher's as captured (log-probabilities)."""
    model = pair.student.model
    stages = None
    if logits.stages is not None and isinstance(model, Ensemble):
        more = stage_logits(model, held.x)
        stages = [np.concatenate([a, b]) for a, b in zip(logits.stages, more, strict=True)]
    student = (
        stages[-1] if stages else np.concatenate([logits.student, student_logits(model, held.x)])
    )
    teacher = np.concatenate([logits.teacher, held.logits])
    return PairLogits(student, teacher, stages, logits.policy)


def load_calibration(run: RunDir) -> tuple[Calibration, list[StudentStage]]:
    calibration = Calibration.model_validate_json((run / RunDir.CALIBRATION).read_text())
    path = run / RunDir.STAGES
    stages = [StudentStage(**s) for s in json.loads(path.read_text())] if path.is_file() else []
    return calibration, stages
