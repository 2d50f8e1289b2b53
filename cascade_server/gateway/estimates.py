"""Estimates from shadow samples, with confidence intervals (pure functions on counts).

Shadow samples are student answers also sent to the teacher; the teacher is the reference, so
every figure here is *agreement with the teacher*, not accuracy against labels (the teacher
errs too: on the Fashion-MNIST cascade about 7% of the time). Strata are margin buckets: the
share of student answers in each stratum is known exactly (every answer is counted), the
agreement inside a stratum is estimated from its samples, and the strata are combined by their
known weights (post-stratification). Intervals are Clopper-Pearson on the effective sample size
(Korn & Graubard, 1998): exact for one stratum, conservative and never narrower than the
sampling allows for several. Answers in strata without samples count as unknown (see
`agreement`): the interval widens rather than assume they agree like the sampled ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The beta quantile (what scipy.stats' beta.ppf calls, without the ~1,100 modules scipy.stats
# imports); imported here, at start-up, never first on the event loop.
from scipy.special import betaincinv


@dataclass(frozen=True)
class Estimate:
    value: float
    lower: float
    upper: float
    samples: int  # shadow samples behind it

    @property
    def known(self) -> bool:
        return self.samples > 0


UNKNOWN = Estimate(float("nan"), 0.0, 1.0, 0)


def _cp(x: float, n: float, confidence: float) -> tuple[float, float]:
    """Clopper-Pearson for a possibly fractional count x of n."""
    tail = (1.0 - confidence) / 2
    lower = 0.0 if x <= 0 else float(betaincinv(x, n - x + 1, tail))
    upper = 1.0 if x >= n else float(betaincinv(x + 1, n - x, 1 - tail))
    return lower, upper


def impute(answered: np.ndarray, shadowed: np.ndarray) -> np.ndarray:
    """For each stratum, the sampled stratum whose agreement stands in for it: itself when
    sampled, else the nearest sampled one below (lower margins agree less: the pessimistic
    side), else the nearest above. -1 when no stratum is sampled."""
    sampled = np.flatnonzero(shadowed > 0)
    if not sampled.size:
        return np.full(len(answered), -1)
    below = np.searchsorted(sampled, np.arange(len(answered)), side="right") - 1
    out: np.ndarray = np.where(below >= 0, sampled[np.maximum(below, 0)], sampled[0])
    return out


def agreement(
    answered: np.ndarray,
    shadowed: np.ndarray,
    disagreed: np.ndarray,
    confidence: float = 0.95,
    finite: bool = True,
) -> Estimate:
    """The share of all student answers the teacher agrees with, by stratum: `answered[b]`
    student answers, `shadowed[b]` of them sampled, `disagreed[b]` of those answered
    otherwise by the teacher.

    Strata with answers but no sample (sparse ones, or all of them while shadows are dropped
    under load) are not assumed to agree like the rest: the interval takes their share `u` of
    the answers as unknown, anywhere in [0, 1] (`[(1-u) L, (1-u) U + u]` around the sampled
    strata's `[L, U]`), and the point value borrows the agreement of the nearest sampled stratum
    below. A window of unsampled answers widens the interval; it never narrows it."""
    answered = np.asarray(answered, float)
    shadowed = np.asarray(shadowed, float)
    disagreed = np.asarray(disagreed, float)
    sampled = shadowed > 0
    if not sampled.any():
        return UNKNOWN
    p_all = np.where(sampled, 1.0 - disagreed / np.maximum(shadowed, 1e-12), 0.0)
    a, s, p = answered[sampled], shadowed[sampled], p_all[sampled]
    # Samples whose answers left the window (buckets rotate independently): weigh by samples.
    weights = a / a.sum() if a.sum() > 0 else s / s.sum()
    value_s = float((weights * p).sum())
    # Variance of the post-stratified mean, with the finite-population correction (`finite`:
    # the answers of this window are the population; not for tallies over a longer horizon
    # than the answers they are weighted by, which estimate the traffic to come).
    fpc = np.clip(1.0 - s / np.maximum(a, 1.0), 0.0, 1.0) if finite else np.ones_like(s)
    variance = float((weights**2 * p * (1 - p) / s * fpc).sum())
    n = float(s.sum())
    n_eff = min(value_s * (1 - value_s) / variance, n) if variance > 0 else n
    lower_s, upper_s = _cp(value_s * n_eff, n_eff, confidence)
    total = float(answered.sum())
    unsampled = float(answered[~sampled].sum())
    u = unsampled / total if total > 0 else 0.0
    if u == 0.0:
        return Estimate(value_s, lower_s, upper_s, int(n))
    value = float((answered * p_all[impute(answered, shadowed)]).sum() / total)
    lower, upper = (1 - u) * lower_s, (1 - u) * upper_s + u
    return Estimate(min(max(value, lower), upper), lower, upper, int(n))


def cascade_agreement(student: Estimate, student_items: float, teacher_items: float) -> Estimate:
    """Agreement of every answer with the teacher: the teacher's own answers agree by
    definition, the student's are `student`."""
    total = student_items + teacher_items
    if total == 0 or not student.known:
        if total and teacher_items == total:
            return Estimate(1.0, 1.0, 1.0, 0)
        return UNKNOWN
    share = student_items / total
    return Estimate(
        1 - share * (1 - student.value),
        1 - share * (1 - student.lower),
        1 - share * (1 - student.upper),
        student.samples,
    )


def error_above(
    answered: np.ndarray,
    shadowed: np.ndarray,
    disagreed: np.ndarray,
    start: int,
    confidence: float = 0.95,
    finite: bool = True,
) -> Estimate:
    """Disagreement (the student's live error, teacher as reference) among answers in strata
    `start` and above."""
    est = agreement(answered[start:], shadowed[start:], disagreed[start:], confidence, finite)
    if not est.known:
        return UNKNOWN
    return Estimate(1 - est.value, 1 - est.upper, 1 - est.lower, est.samples)


def stages_agreement(
    answered: np.ndarray,
    shadowed: np.ndarray,
    disagreed: np.ndarray,
    start: int,
    stage_answered: np.ndarray,
    stage_shadowed: np.ndarray,
    stage_disagreed: np.ndarray,
    confidence: float = 0.95,
    finite: bool = True,
) -> Estimate:
    """Agreement of every answer of an N-stage cascade with the teacher (a two-stage one too):
    `stage_answered` items answered per stage (the student first, the teacher last), the
    tiers' shadow tallies `stage_shadowed`/`stage_disagreed` (per stage; the student's entry
    unused), and the student's by margin stratum, of which only strata `start` and up count
    (below the threshold in force, a stratum's answers are from before a move).

    Post-stratified by stage: the student's strata, weighted to its share of the answers, and
    one stratum per tier are combined as `agreement` does (unsampled ones widen the
    interval); the teacher's own answers agree by definition (`cascade_agreement`)."""
    stage_answered = np.asarray(stage_answered, float)
    if stage_answered.size < 2 or stage_answered.sum() <= 0:
        return UNKNOWN
    own = stage_answered[0]
    tiers = stage_answered[1:-1]
    a, s, d = (np.asarray(x, float)[start:] for x in (answered, shadowed, disagreed))
    if a.sum() > 0:
        a = a * (own / a.sum())
    else:  # no stratum counts (yet): the student's share as one unsampled stratum
        a, s, d = np.array([own]), np.zeros(1), np.zeros(1)
    k = tiers.size

    def per_tier(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, float)
        return x[1:-1] if x.size == stage_answered.size else np.zeros(k)

    # The tiers first: an unsampled stratum borrows the agreement of the nearest sampled one
    # below it (`impute`), and a tier placed after the student's strata would borrow its surest
    # answers' (an unsampled tier just after a row move would read near 1).
    est = agreement(
        np.concatenate([tiers, a]),
        np.concatenate([per_tier(stage_shadowed), s]),
        np.concatenate([per_tier(stage_disagreed), d]),
        confidence,
        finite,
    )
    return cascade_agreement(est, own + float(tiers.sum()), float(stage_answered[-1]))
