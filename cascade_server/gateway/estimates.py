"""Estimates from shadow samples, with confidence intervals (pure functions on counts).

Shadow samples are student answers also sent to the teacher; the teacher is the reference, so
every figure here is *agreement with the teacher*, not accuracy against labels (the teacher
errs too: on the Fashion-MNIST cascade about 7% of the time). Strata are margin buckets: the
share of student answers in each stratum is known exactly (every answer is counted), the
agreement inside a stratum is estimated from its samples, and the strata are combined by their
known weights (post-stratification). Intervals are Clopper-Pearson on the effective sample size
(Korn & Graubard, 1998): exact for one stratum, conservative and never narrower than the
sampling allows for several.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


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
    from scipy.stats import beta

    tail = (1.0 - confidence) / 2
    lower = 0.0 if x <= 0 else float(beta.ppf(tail, x, n - x + 1))
    upper = 1.0 if x >= n else float(beta.ppf(1 - tail, x + 1, n - x))
    return lower, upper


def collapse(
    answered: np.ndarray, shadowed: np.ndarray, disagreed: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merges strata without samples into their neighbour above (margins rise with the
    stratum), so every stratum left with answers also has samples; strata with no answers
    are dropped."""
    out_a, out_s, out_d = [], [], []
    carry_a = carry_s = carry_d = 0
    for a, s, d in zip(answered.tolist(), shadowed.tolist(), disagreed.tolist(), strict=True):
        carry_a, carry_s, carry_d = carry_a + a, carry_s + s, carry_d + d
        if carry_s > 0:
            out_a.append(carry_a)
            out_s.append(carry_s)
            out_d.append(carry_d)
            carry_a = carry_s = carry_d = 0
    if carry_a and out_a:  # answers above the last sampled stratum join it
        out_a[-1] += carry_a
    return np.array(out_a, float), np.array(out_s, float), np.array(out_d, float)


def agreement(
    answered: np.ndarray,
    shadowed: np.ndarray,
    disagreed: np.ndarray,
    confidence: float = 0.95,
) -> Estimate:
    """The share of all student answers the teacher agrees with, by stratum: `answered[b]`
    student answers, `shadowed[b]` of them sampled, `disagreed[b]` of those answered
    otherwise by the teacher."""
    a, s, d = collapse(answered, shadowed, disagreed)
    if not s.sum():
        return UNKNOWN
    weights = a / a.sum()
    p = 1.0 - d / s
    value = float((weights * p).sum())
    # Variance of the post-stratified mean, with the finite-population correction.
    fpc = np.clip(1.0 - s / np.maximum(a, 1.0), 0.0, 1.0)
    variance = float((weights**2 * p * (1 - p) / s * fpc).sum())
    n = float(s.sum())
    if variance > 0:
        n_eff = min(value * (1 - value) / variance, n)
    else:
        n_eff = n
    lower, upper = _cp(value * n_eff, n_eff, confidence)
    return Estimate(value, lower, upper, int(n))


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
) -> Estimate:
    """Disagreement (the student's live error, teacher as reference) among answers in strata
    `start` and above."""
    est = agreement(answered[start:], shadowed[start:], disagreed[start:], confidence)
    if not est.known:
        return UNKNOWN
    return Estimate(1 - est.value, 1 - est.upper, 1 - est.lower, est.samples)
