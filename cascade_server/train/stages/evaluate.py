"""Evaluation: accuracy-vs-delegation curves of a student+teacher pair on the test split, their
summary numbers (METHODS.md section 5), the accuracy-vs-cost frontier (the two-stage cascade's,
and an anytime student's N-stage one), plots comparing several students, and the `evaluate`
stage that writes them into the run directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...bundle import CalibrationRow
from ..methods import Ensemble
from ..records import OutputPolicy, RunDir
from .anytime import member_costs
from .calibrate import PLAIN, cascade_rows
from .distill import Pair, pair_logits
from .frontier import frontier, row_summary
from .prepare import Prepared

# numpy 2 renamed trapz to trapezoid (and removed trapz in 2.4); numpy 1 has only trapz.
_trapezoid = getattr(np, "trapezoid", None) or np.trapz


def summarize(rows: list[CalibrationRow], student_acc: float, teacher_acc: float) -> dict:
    rates = np.array([r.delegation_rate for r in rows])
    accs = np.array([r.cascade_accuracy for r in rows])
    if rates[-1] < 1.0:
        # Saturated students have margins of exactly 1.0, which no threshold <= 1 delegates;
        # delegating everything is still a point of the curve: the teacher's accuracy.
        rates, accs = np.append(rates, 1.0), np.append(accs, teacher_acc)

    def acc_at(q: float) -> float | None:
        # Below the rate that class-based delegation forces, the cascade cannot operate.
        return float(np.interp(q, rates, accs)) if q >= rates.min() - 1e-9 else None

    target = teacher_acc - 0.005
    reaching = rates[accs >= target]
    gap = teacher_acc - student_acc
    return {
        "student_accuracy": student_acc,
        "teacher_accuracy": teacher_acc,
        "cascade_accuracy": {f"{q:.1f}": acc_at(q) for q in (0.1, 0.2, 0.3)},
        # Smallest delegation rate whose cascade accuracy reaches teacher accuracy - 0.5 pt.
        "delegation_to_teacher_minus_0.5pt": float(reaching.min()) if reaching.size else None,
        # Area under accuracy vs delegation rate, over [first rate, 1].
        "auc": float(_trapezoid(accs, rates)),
        "gap_recovered": {
            f"{q:.1f}": None if acc is None or gap <= 0 else (acc - student_acc) / gap
            for q, acc in ((q, acc_at(q)) for q in (0.1, 0.2, 0.3))
        },
        "min_delegation_rate": float(rates.min()),
    }


def evaluate_logits(
    student_logits: np.ndarray,
    teacher_logits: np.ndarray,
    labels: np.ndarray,
    *,
    cost_student: float,
    policy: OutputPolicy = PLAIN,
    steps: int = 100,
) -> dict:
    rows = cascade_rows(
        student_logits,
        teacher_logits,
        labels,
        cost_student=cost_student,
        steps=steps,
        policy=policy,
    )
    s_acc = float((policy.predictions(student_logits, teacher_logits.shape[1]) == labels).mean())
    t_acc = float((teacher_logits.argmax(1) == labels).mean())
    return {"rows": [r.model_dump() for r in rows], "summary": summarize(rows, s_acc, t_acc)}


def plot(curves: dict[str, dict], path: Path, title: str = "") -> Path:
    """Cascade accuracy vs delegation rate, one line per student; the teacher as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    teacher_acc = None
    for name, ev in curves.items():
        rates = [r["delegation_rate"] for r in ev["rows"]]
        accs = [r["cascade_accuracy"] for r in ev["rows"]]
        ax.plot(rates, accs, label=f"{name} (student {ev['summary']['student_accuracy']:.3f})")
        teacher_acc = ev["summary"]["teacher_accuracy"]
    if teacher_acc is not None:
        ax.axhline(teacher_acc, color="black", ls="--", lw=1, label=f"teacher {teacher_acc:.3f}")
    ax.set_xlabel("delegation rate (share of requests sent to the teacher)")
    ax.set_ylabel("cascade accuracy")
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "accuracy vs delegation")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def frontier_curves(
    student_logits: np.ndarray,
    teacher_logits: np.ndarray,
    labels: np.ndarray,
    *,
    cost_student: float,
    policy: OutputPolicy = PLAIN,
    stages: list[np.ndarray] | None = None,
    stage_costs: list[float] | None = None,
    split: str = "test",
) -> dict:
    """Accuracy vs expected cost (the teacher alone = 1.0): `two_stage`, the student then the
    teacher (a row per percentile of its margins); `stages`, an anytime student's members as the
    stages of an N-stage cascade (every setting of a grid of thresholds, frontier.py), else
    None. Rows: cost, accuracy, teacher share, thresholds (one per stage but the teacher) and
    the share each stage answers, sorted by cost."""
    two = frontier(
        [student_logits],
        teacher_logits,
        labels,
        [cost_student],
        grid=101,
        split=split,
        policy=policy,
    )
    out: dict = {
        "split": split,
        "n": two.n,
        "teacher_accuracy": float((teacher_logits.argmax(1) == labels).mean()),
        "two_stage": {
            "costs": [cost_student, 1.0],
            "rows": [row_summary(r) for r in two.rows],
        },
        "stages": None,
    }
    if stages is not None and len(stages) > 1:
        costs = stage_costs if stage_costs is not None else [0.0] * len(stages)
        many = frontier(stages, teacher_logits, labels, costs, split=split, policy=policy)
        out["stages"] = {
            "names": [f"stage_{k + 1}" for k in range(len(stages))],
            "costs": [*costs, 1.0],
            "rows": [row_summary(r) for r in many.rows],
        }
    return out


def plot_frontier(curves: dict[str, dict], path: Path, title: str = "") -> Path:
    """Cascade accuracy vs expected cost per item, one two-stage curve per run and the N-stage
    frontier where a run has one; the teacher alone at cost 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    teacher_acc = None
    for name, ev in curves.items():
        front = ev.get("frontier")
        if not front:
            continue
        rows = front["two_stage"]["rows"]
        line = ax.plot([r["cost"] for r in rows], [r["accuracy"] for r in rows], label=name)[0]
        if front.get("stages"):
            rows = front["stages"]["rows"]
            n = len(front["stages"]["names"])
            ax.plot(
                [r["cost"] for r in rows],
                [r["accuracy"] for r in rows],
                ls="--",
                marker=".",
                ms=3,
                color=line.get_color(),
                label=f"{name}, {n} stages + teacher",
            )
        teacher_acc = front["teacher_accuracy"]
    if teacher_acc is not None:
        ax.plot([1.0], [teacher_acc], "k*", ms=9, label=f"teacher alone {teacher_acc:.3f}")
    ax.set_xlabel("expected cost per item (the teacher alone = 1)")
    ax.set_ylabel("cascade accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "accuracy vs cost")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def evaluate(prep: Prepared, run_dir: Path, *, pair: Pair | None = None) -> dict:
    """The stage: evaluation.json (curve rows, summary, the accuracy-vs-cost frontier) on the
    test split."""
    run = RunDir(run_dir)
    pair = pair or Pair.load(prep, run_dir)
    logits = pair_logits(prep, run, "test", pair)
    record = run.record()
    result = evaluate_logits(
        logits.student,
        logits.teacher,
        prep.y["test"],
        cost_student=record.cost_ratio(),
        policy=logits.policy,
    )
    if logits.stages is not None:  # anytime accuracy after each member
        result["summary"]["stage_accuracy"] = [
            float((s.argmax(1) == prep.y["test"]).mean()) for s in logits.stages
        ]
    model = pair.student.model
    result["frontier"] = frontier_curves(
        logits.student,
        logits.teacher,
        prep.y["test"],
        cost_student=record.cost_ratio(),
        policy=logits.policy,
        stages=logits.stages,
        stage_costs=member_costs(model, prep, record.teacher.macs if record.teacher else None)
        if logits.stages is not None and isinstance(model, Ensemble)
        else None,
    )
    run.write_json(RunDir.EVALUATION, result)
    run.update_record(evaluation=result["summary"])
    return result
