"""Shadow estimates on counts: the stratified agreement and its interval, which must cover the
true value as often as its confidence says (checked by simulation)."""

import numpy as np
import pytest

from cascade_server.gateway.estimates import (
    agreement,
    cascade_agreement,
    error_above,
    impute,
    stages_agreement,
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


def test_unsampled_strata_borrow_from_below_and_widen_the_interval():
    # Stratum 0 has answers and no sample (the low margins, say, while shadows were dropped):
    # nothing says how well the student does there.
    answered = np.array([40.0, 10.0, 0.0, 50.0])
    shadowed = np.array([0.0, 10.0, 0.0, 50.0])
    disagreed = np.array([0.0, 5.0, 0.0, 0.0])
    assert impute(answered, shadowed).tolist() == [1, 1, 1, 3]  # none below 1: from above
    est = agreement(answered, shadowed, disagreed)
    sampled_only = agreement(answered[1:], shadowed[1:], disagreed[1:])
    assert est.value == pytest.approx((40 * 0.5 + 10 * 0.5 + 50 * 1.0) / 100)
    # 40% of the answers are unknown: anywhere in [0, 1] for them.
    assert est.lower == pytest.approx(0.6 * sampled_only.lower)
    assert est.upper == pytest.approx(min(0.6 * sampled_only.upper + 0.4, 1.0))
    assert est.upper - est.lower > sampled_only.upper - sampled_only.lower
    empty = agreement(np.array([5.0, 5.0]), np.zeros(2), np.zeros(2))
    assert not empty.known and empty.lower == 0 and empty.upper == 1


def test_dropped_shadows_in_the_low_strata_do_not_make_the_estimate_optimistic():
    # The low, poorly-agreeing strata go unsampled (shadows dropped under load): the interval
    # must still hold the true agreement, which a borrow-from-above estimate would overstate.
    rng = np.random.default_rng(3)
    stratum, agrees = population(rng)
    truth = agrees.mean()
    answered, shadowed, disagreed = sample(rng, stratum, agrees, 0.05)
    shadowed[:5] = disagreed[:5] = 0.0
    est = agreement(answered, shadowed, disagreed)
    assert est.lower <= truth <= est.upper
    assert est.value <= agreement(answered[5:], shadowed[5:], disagreed[5:]).value


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


def test_the_stages_estimate_of_a_two_stage_cascade_is_the_cascades():
    """Student strata, and the answers counted per stage [student, teacher]: the same estimate
    as the student's agreement scaled by its share of the answers."""
    answered = np.array([40.0, 60.0])
    shadowed = np.array([20.0, 30.0])
    disagreed = np.array([4.0, 1.0])
    student = agreement(answered, shadowed, disagreed)
    both = stages_agreement(
        answered, shadowed, disagreed, 0, np.array([100.0, 25.0]), np.zeros(0), np.zeros(0)
    )
    expected = cascade_agreement(student, 100, 25)
    assert (both.value, both.lower, both.upper) == pytest.approx(
        (expected.value, expected.lower, expected.upper)
    )


def test_the_stages_estimate_counts_each_tier_by_its_share_and_its_own_samples():
    """Student 50 answers (all agree), a tier 30 (sampled 20, 10 disagree), teacher 20: the
    cascade agrees on 50 + 15 + 20 of 100 at the point; the tier's samples widen the interval."""
    answered, shadowed, disagreed = np.array([50.0]), np.array([50.0]), np.array([0.0])
    est = stages_agreement(
        answered,
        shadowed,
        disagreed,
        0,
        np.array([50.0, 30.0, 20.0]),
        np.array([0.0, 20.0, 0.0]),
        np.array([0.0, 10.0, 0.0]),
    )
    assert est.value == pytest.approx(0.85)
    assert est.lower < 0.85 < est.upper
    assert est.samples == 70
    # The tier never sampled: its 30% of the answers are unknown, anywhere in [0, 1].
    blind = stages_agreement(
        answered,
        shadowed,
        disagreed,
        0,
        np.array([50.0, 30.0, 20.0]),
        np.zeros(3),
        np.zeros(3),
    )
    assert blind.lower <= 0.7 + 1e-9 and blind.upper == pytest.approx(1.0)


def test_the_stages_estimate_reads_the_student_only_from_the_threshold_up():
    """Strata below the threshold in force hold answers from before a move (the student no
    longer answers them): they are left out, whatever they say."""
    answered = np.array([100.0, 100.0])
    shadowed = np.array([50.0, 50.0])
    disagreed = np.array([50.0, 0.0])  # the low stratum always wrong
    est = stages_agreement(
        answered, shadowed, disagreed, 1, np.array([100.0, 100.0]), np.zeros(0), np.zeros(0)
    )
    assert est.value == pytest.approx(1.0)


def test_an_unsampled_tier_does_not_borrow_the_students_surest_agreement():
    """Just after a row move the tier's tallies are empty: its share is unknown (the interval
    widens), and its point value is not the student's highest stratum's."""
    answered = np.array([100.0, 100.0])
    shadowed = np.array([50.0, 50.0])
    disagreed = np.array([10.0, 0.0])  # 80% and 100% agreement
    est = stages_agreement(
        answered,
        shadowed,
        disagreed,
        0,
        np.array([200.0, 200.0, 0.0]),  # student, tier, teacher
        np.zeros(3),
        np.zeros(3),
    )
    # The tier borrows the nearest sampled stratum above it: the student's least sure.
    assert est.value == pytest.approx(0.5 * 0.9 + 0.5 * 0.8)
    assert est.lower <= 0.45 and est.upper >= 0.95  # half the answers anywhere in [0, 1]
