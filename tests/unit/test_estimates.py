"""Shadow estimates on counts: the stratified agreement and its interval, which must cover the
true value as often as its confidence says (checked by simulation)."""

import numpy as np
import pytest

from cascade_server.gateway.estimates import (
    agreement,
    cascade_agreement,
    collapse,
    error_above,
)


def population(rng, n=20_000, strata=10):
    """Student answers by margin stratum, with agreement rising with the margin."""
    margins = rng.beta(3, 1, n)
    stratum = np.minimum((margins * strata).astype(int), strata - 1)
    p_agree = 0.6 + 0.4 * margins
    agrees = rng.uniform(size=n) < p_agree
    return stratum, agrees


def sample(rng, stratum, agrees, fraction, strata=10):
    picked = rng.uniform(size=len(stratum)) < fraction
    answered = np.bincount(stratum, minlength=strata).astype(float)
    shadowed = np.bincount(stratum[picked], minlength=strata).astype(float)
    disagreed = np.bincount(stratum[picked & ~agrees], minlength=strata).astype(float)
    return answered, shadowed, disagreed


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.2])
def test_the_interval_covers_the_true_agreement_as_often_as_it_says(fraction):
    rng = np.random.default_rng(0)
    stratum, agrees = population(rng)
    truth = agrees.mean()
    covered = 0
    trials = 300
    for _ in range(trials):
        est = agreement(*sample(rng, stratum, agrees, fraction), confidence=0.95)
        covered += est.lower <= truth <= est.upper
        assert est.lower <= est.value <= est.upper
    assert covered / trials >= 0.93  # 95% nominal, on 300 trials


def test_more_samples_narrow_the_interval():
    rng = np.random.default_rng(1)
    stratum, agrees = population(rng)
    widths = []
    for fraction in (0.01, 0.05, 0.2):
        est = agreement(*sample(rng, stratum, agrees, fraction))
        widths.append(est.upper - est.lower)
    assert widths[0] > widths[1] > widths[2]


def test_strata_without_samples_join_their_neighbour():
    a, s, d = collapse(
        np.array([5, 10, 0, 20.0]), np.array([0, 2, 0, 3.0]), np.array([0, 1, 0, 0.0])
    )
    assert a.tolist() == [15, 20] and s.tolist() == [2, 3] and d.tolist() == [1, 0]
    empty = agreement(np.array([5.0, 5.0]), np.zeros(2), np.zeros(2))
    assert not empty.known and empty.lower == 0 and empty.upper == 1


def test_the_cascade_counts_the_teachers_own_answers_as_agreeing():
    student = agreement(np.array([100.0]), np.array([50.0]), np.array([5.0]))
    both = cascade_agreement(student, student_items=800, teacher_items=200)
    assert both.value == pytest.approx(0.2 + 0.8 * 0.9)
    assert both.lower <= both.value <= both.upper


def test_error_above_a_stratum_uses_only_the_answers_above_it():
    answered = np.array([100.0, 100.0])
    shadowed = np.array([50.0, 50.0])
    disagreed = np.array([25.0, 0.0])  # errors only in the low stratum
    assert error_above(answered, shadowed, disagreed, 1).value == 0.0
    assert error_above(answered, shadowed, disagreed, 0).value == pytest.approx(0.25)
