"""Every threshold of an N-stage cascade calibrated at once: the accuracy-vs-cost frontier over a
grid of per-stage margin quantiles, and the rule that picks one of its rows for a target.

The cascade (as the gateway runs it): stage 0 is the student, stages 1..K the tiers, the teacher
last. An item moves from stage k to k+1 iff stage k's top-1 minus top-2 softmax margin is below
rho_k (at stage 0 also when the student's class-based rules delegate it: `OutputPolicy`), and
the answer is the first stage that keeps it. Expected cost per item = cost_0 + sum_k
share_reaching_k * cost_k + share_reaching_teacher * cost_teacher (the teacher alone = 1.0).

Every setting of the grid is counted at once: an item's place in stage k's sorted thresholds
(`c_k`, the number of them at or below its margin) says at which thresholds it moves on
(index >= c_k), so the items answered, right, and reaching each stage at every setting are
cumulative sums of one histogram over (c_0, .., c_K): O(n K + grid^K), not O(n grid^K).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...bundle import Frontier, FrontierRow
from ..records import OutputPolicy

log = logging.getLogger(__name__)

PLAIN = OutputPolicy()
# Settings the grid may hold: 41 levels per stage for 3 stages is 68,921; 4 stages need <= 40.
MAX_SETTINGS = 5_000_000


@dataclass(frozen=True)
class _Stage:
    thresholds: np.ndarray  # (G,) ascending, unique
    places: np.ndarray  # (n,) int: thresholds at or below the item's margin (0: always moves on)
    right: np.ndarray  # (n,) bool: the stage's answer is the label
    agrees: np.ndarray  # (n,) bool: the stage's answer is the teacher's


def _levels(grid: int | Sequence[float]) -> np.ndarray:
    if isinstance(grid, int):
        if grid < 2:
            raise ValueError("the grid needs at least 2 levels per stage (0 and 1)")
        return np.linspace(0.0, 1.0, grid)
    levels = np.asarray(grid, dtype=np.float64)
    if levels.ndim != 1 or not len(levels) or ((levels < 0) | (levels > 1)).any():
        raise ValueError("grid levels are quantiles in [0, 1]")
    return levels


def _stage(
    logits: np.ndarray,
    labels: np.ndarray,
    teacher: np.ndarray,
    n_classes: int,
    levels: np.ndarray,
    policy: OutputPolicy,
) -> _Stage:
    base = policy.decide(logits, 0.0)
    forced = base.forced  # class-based rules (stage 0) and non-finite rows: at any threshold
    margins = base.margins
    free = margins[~forced] if (~forced).any() else np.array([0.0])
    # rho = the q-quantile of margins, as in cascade_rows; the ends are exact: 0 passes on only
    # what is forced, 1 everything but certainties.
    rhos = [0.0 if q == 0.0 else 1.0 if q == 1.0 else float(np.quantile(free, q)) for q in levels]
    thresholds = np.unique(np.asarray(rhos, dtype=np.float64))
    places = np.where(forced, 0, np.searchsorted(thresholds, margins, side="right"))
    predictions = policy.predictions(logits, n_classes)
    agrees = predictions == teacher
    return _Stage(thresholds, places.astype(np.int64), predictions == labels, agrees)


def _suffix(h: np.ndarray, axis: int) -> np.ndarray:
    return np.flip(np.cumsum(np.flip(h, axis), axis), axis)


def _pad(h: np.ndarray, ndim: int) -> np.ndarray:
    """Trailing axes of length 1, so that counts over the first stages broadcast over all."""
    return h.reshape(h.shape + (1,) * (ndim - h.ndim))


@dataclass(frozen=True)
class Grid:
    """Counts at every setting of the grid, arrays of shape (G_0, .., G_K)."""

    thresholds: list[np.ndarray]
    answered: list[np.ndarray]  # per stage, the teacher last: items it answers
    correct: np.ndarray  # items the cascade answers right
    # Items the cascade answers as the teacher does: what the gateway can check live (shadow
    # samples), so what a target accuracy is held at there.
    agreeing: np.ndarray
    cost: np.ndarray  # expected cost per item
    n: int


def grid_counts(
    stage_logits: Sequence[np.ndarray],
    teacher_logits: np.ndarray,
    labels: np.ndarray,
    costs: Sequence[float],
    *,
    cost_teacher: float = 1.0,
    grid: int | Sequence[float] = 41,
    policy: OutputPolicy = PLAIN,
) -> Grid:
    """Every setting of the grid counted (see the module docstring); `frontier` keeps the best."""
    if not stage_logits:
        raise ValueError("a cascade needs at least the student")
    if len(costs) != len(stage_logits):
        raise ValueError(f"{len(stage_logits)} stages need {len(stage_logits)} costs")
    n, n_classes = teacher_logits.shape
    labels = np.asarray(labels)
    if n == 0 or any(len(s) != n for s in stage_logits) or len(labels) != n:
        raise ValueError("every stage, the teacher and the labels need the same items (n > 0)")
    for k, s in enumerate(stage_logits[1:], 1):
        if s.ndim != 2 or s.shape[1] != n_classes:
            raise ValueError(
                f"stage {k} answers {s.shape[1:]} outputs, the cascade has {n_classes}"
            )
    levels = _levels(grid)
    teacher = teacher_logits.argmax(1)
    stages = [
        _stage(logits, labels, teacher, n_classes, levels, policy if k == 0 else PLAIN)
        for k, logits in enumerate(stage_logits)
    ]
    sizes = tuple(len(s.thresholds) for s in stages)
    if int(np.prod(sizes, dtype=np.int64)) > MAX_SETTINGS:
        raise ValueError(f"a grid of {sizes} settings is too large: use fewer levels per stage")
    n_stages = len(stages)
    bins = tuple(g + 1 for g in sizes)  # places run 0..G
    flat = np.ravel_multi_index(tuple(s.places for s in stages), bins)
    length = int(np.prod(bins))

    def histogram(among: np.ndarray | None = None) -> np.ndarray:
        """Items per (c_0, .., c_K), all or those where `among` holds (exact integers)."""
        chosen = flat if among is None else flat[among]
        return np.bincount(chosen, minlength=length).reshape(bins)

    def passed(h: np.ndarray, upto: int) -> np.ndarray:
        """Items every stage before `upto` passes on (index j moves on iff place <= j)."""
        h = h.sum(axis=tuple(range(upto, n_stages)))
        for m in range(upto):
            h = np.cumsum(h, axis=m)
        return _pad(h[tuple(slice(0, g) for g in sizes[:upto])], n_stages)

    def kept(h: np.ndarray, k: int) -> np.ndarray:
        """Items stage k answers: passed on before it, kept by it (index j iff place > j)."""
        h = h.sum(axis=tuple(range(k + 1, n_stages)))
        for m in range(k):
            h = np.cumsum(h, axis=m)
        h = _suffix(h, k)
        index = (*(slice(0, g) for g in sizes[:k]), slice(1, sizes[k] + 1))
        return _pad(h[index], n_stages)

    ones = histogram()
    answered = [kept(ones, k) for k in range(n_stages)] + [passed(ones, n_stages)]
    correct = passed(histogram(teacher == labels), n_stages)
    agreeing = answered[-1]  # the teacher agrees with itself
    for k, stage in enumerate(stages):
        correct = correct + kept(histogram(stage.right), k)
        agreeing = agreeing + kept(histogram(stage.agrees), k)
    spend = costs[0] * n + cost_teacher * answered[-1]
    for k in range(1, n_stages):  # every item reaching tier k pays for it
        spend = spend + costs[k] * passed(ones, k)
    return Grid(
        thresholds=[stage.thresholds for stage in stages],
        answered=[np.broadcast_to(a, sizes).astype(np.int64) for a in answered],
        correct=np.broadcast_to(correct, sizes).astype(np.int64),
        agreeing=np.broadcast_to(agreeing, sizes).astype(np.int64),
        cost=np.broadcast_to(spend / n, sizes).astype(np.float64),
        n=n,
    )


def frontier(
    stage_logits: Sequence[np.ndarray],
    teacher_logits: np.ndarray,
    labels: np.ndarray,
    costs: Sequence[float],
    *,
    cost_teacher: float = 1.0,
    grid: int | Sequence[float] = 41,
    split: str = "val",
    policy: OutputPolicy = PLAIN,
) -> Frontier:
    """The accuracy-vs-cost frontier of the cascade student -> tiers -> teacher.

    `stage_logits`: the student's outputs first (its class-based rules and extra outputs read
    through `policy`, as `cascade_rows` does), then each tier's logits over the cascade's
    classes, (n, .) each. `costs`: per item at each of those stages, relative to the teacher
    (`cost_teacher`). `grid`: quantile levels of each stage's margins (an int: that many evenly
    spaced in [0, 1]); the quantiles are over all the split's items, not only those reaching
    the stage. Returns the settings no other one beats (>= accuracy at <= cost, one strict),
    by cost: both cost and accuracy increase along the rows. Ties (equal cost and accuracy)
    keep the setting of the lowest thresholds, first stages first."""
    g = grid_counts(
        stage_logits,
        teacher_logits,
        labels,
        costs,
        cost_teacher=cost_teacher,
        grid=grid,
        policy=policy,
    )
    cost = g.cost.ravel()
    correct = g.correct.ravel()
    agreeing = g.agreeing.ravel()
    order = np.lexsort((np.arange(cost.size), -correct, cost))  # by cost, then accuracy
    ranked = correct[order]
    best_before = np.maximum.accumulate(np.concatenate([[-1], ranked[:-1]]))
    keep = order[ranked > best_before]
    settings = np.unravel_index(keep, g.correct.shape)
    rows = []
    for i, flat in enumerate(keep):
        rows.append(
            FrontierRow(
                thresholds=tuple(
                    float(t[j[i]]) for t, j in zip(g.thresholds, settings, strict=True)
                ),
                answered=tuple(float(a.ravel()[flat]) / g.n for a in g.answered),
                cascade_accuracy=float(correct[flat]) / g.n,
                expected_cost=float(cost[flat]),
                teacher_agreement=float(agreeing[flat]) / g.n,
            )
        )
    return Frontier(split=split, n=g.n, rows=tuple(rows))


def choose_row(
    front: Frontier,
    *,
    target_accuracy: float | None = None,
    cost_budget: float | None = None,
    teacher_rate: float | None = None,
) -> FrontierRow:
    """One row for a target: the cheapest reaching `target_accuracy`, or the most accurate
    within `cost_budget`, or the most accurate whose teacher share is within `teacher_rate`
    (the teacher's load: the calibration's target delegation rate), at most one of them. A
    teacher share no row gets down to (class-based rules force more) takes the lowest one."""
    if sum(t is not None for t in (target_accuracy, cost_budget, teacher_rate)) != 1:
        raise ValueError("give one of a target accuracy, a cost budget or a teacher rate")
    if target_accuracy is not None:
        return front.for_accuracy(target_accuracy)
    if cost_budget is not None:
        return front.for_cost(cost_budget)
    assert teacher_rate is not None
    within = [r for r in front.rows if r.teacher_rate <= teacher_rate + 1e-12]
    if not within:
        lowest = min(front.rows, key=lambda r: (r.teacher_rate, r.expected_cost))
        log.warning(
            "no setting sends only %.3f to the teacher; the lowest share is %.3f",
            teacher_rate,
            lowest.teacher_rate,
        )
        return lowest
    return max(within, key=lambda r: (r.cascade_accuracy, -r.expected_cost))


def pass_rates(row: FrontierRow) -> list[float]:
    """Per stage but the teacher: the share of the items reaching it that move on."""
    out = []
    for k in range(len(row.thresholds)):
        reaching = sum(row.answered[k:])
        out.append(min(1.0, sum(row.answered[k + 1 :]) / reaching) if reaching > 0 else 0.0)
    return out


def row_summary(row: FrontierRow) -> dict[str, object]:
    """A row as the evaluation JSON lists it."""
    return {
        "cost": row.expected_cost,
        "accuracy": row.cascade_accuracy,
        "teacher_agreement": row.teacher_agreement,
        "teacher_share": row.teacher_rate,
        "thresholds": list(row.thresholds),
        "answered": list(row.answered),
    }
