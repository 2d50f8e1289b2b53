"""What the model stages decided for a request, and its JSON form (`Prediction` in schemas.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .outcomes import ANSWERED_BY, BY_TEACHER, DEGRADED, DELEGATED, NAMES

# Per outcome code, what an answer says of it (plain lists: the hot path indexes them per item).
_BY = ANSWERED_BY.tolist()
_DEGRADED = DEGRADED.tolist()
_DELEGATED = DELEGATED.tolist()

if TYPE_CHECKING:
    from .version import StudentVersion


@dataclass
class Answer:
    """One request's items (or a whole batch's, before it is split), in request order."""

    probs: np.ndarray  # (n, classes): the teacher's where it answered, else the student's
    margins: np.ndarray  # (n,) the student's margins
    outcome: np.ndarray  # (n,) int8 Outcome codes (outcomes.py): who answered and why
    threshold: float | np.ndarray  # one for all, or one per item (requests' own thresholds)
    student_s: float  # the student call that served this request's batch
    teacher_s: float = 0.0  # the teacher call, 0 when nothing of this request was sent
    queue_s: float = 0.0  # how long the request waited for its batch to start
    # N-stage cascades: the stage whose answer each row holds (indexes `stage_names`: the
    # student, the tiers, the teacher), and the tier calls of the batch. None: two stages,
    # where the outcome says who answered.
    stage: np.ndarray | None = None
    stage_names: tuple[str, ...] = ("student", "teacher")
    tiers_s: float = 0.0

    def __len__(self) -> int:
        return len(self.margins)

    @property
    def by_teacher(self) -> np.ndarray:
        return np.asarray(BY_TEACHER[self.outcome])

    @property
    def degraded(self) -> np.ndarray:
        return np.asarray(DEGRADED[self.outcome])

    @property
    def delegated(self) -> np.ndarray:
        return np.asarray(DELEGATED[self.outcome])

    def stages(self) -> np.ndarray:
        """(n,) the answering stage's index into `stage_names`."""
        if self.stage is not None:
            return self.stage
        return np.asarray(BY_TEACHER[self.outcome], dtype=np.int8)

    def rows(self, start: int, end: int, queue_s: float) -> Answer:
        s = slice(start, end)
        threshold = self.threshold
        if isinstance(threshold, np.ndarray):
            threshold = threshold[s]
            if (threshold == threshold[0]).all():
                threshold = float(threshold[0])
        return Answer(
            self.probs[s],
            self.margins[s],
            self.outcome[s],
            threshold,
            self.student_s,
            self.teacher_s,
            queue_s,
            None if self.stage is None else self.stage[s],
            self.stage_names,
            self.tiers_s,
        )


@dataclass
class Predictions:
    """A request's answer plus what the response needs: classes, versions, truncation."""

    cascade: str
    classes: tuple[str, ...]
    version: StudentVersion
    answer: Answer
    truncated: list[bool] | None
    preprocess_s: float

    def __len__(self) -> int:
        return len(self.answer.margins)

    def outputs(self, top_k: int, total_s: float) -> list[dict[str, Any]]:
        """One `Prediction` (see schemas.py) per input."""
        a, classes = self.answer, self.classes
        k = min(top_k, len(classes))
        order = np.argsort(-a.probs, axis=1, kind="stable")[:, :k]
        timings = {
            "preprocess": round(self.preprocess_s * 1e3, 3),
            "queue": round(a.queue_s * 1e3, 3),
            "student": round(a.student_s * 1e3, 3),
            "teacher": round(a.teacher_s * 1e3, 3),
            "total": round(total_s * 1e3, 3),
        }
        if a.stage is not None:
            timings["tiers"] = round(a.tiers_s * 1e3, 3)
        answered = None if a.stage is None else [a.stage_names[c] for c in a.stage.tolist()]
        probs, margins, outcomes = a.probs.tolist(), a.margins.tolist(), a.outcome.tolist()
        threshold = a.threshold
        thresholds = threshold.tolist() if isinstance(threshold, np.ndarray) else None
        versions, cascade = self.version.versions, self.cascade
        out = []
        for i, row in enumerate(order.tolist()):
            o = outcomes[i]
            top = [{"label": classes[c], "class_id": c, "probability": probs[i][c]} for c in row]
            item = {
                "label": top[0]["label"],
                "class_id": top[0]["class_id"],
                "top_k": top,
                "margin": margins[i],
                "threshold": threshold if thresholds is None else thresholds[i],
                "delegated": _DELEGATED[o],
                "answered_by": _BY[o] if answered is None else answered[i],
                "outcome": NAMES[o],
                "degraded": _DEGRADED[o],
                "cascade": cascade,
                "versions": versions,
                "timings_ms": timings,
            }
            if self.truncated is not None:
                item["truncated"] = self.truncated[i]
            out.append(item)
        return out
