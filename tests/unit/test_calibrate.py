import math

import numpy as np
import pytest

from cascade_server.policy import softmax, top2_margin
from cascade_server.train.records import OutputPolicy
from cascade_server.train.stages import calibrate_logits as calibrate


def test_table_is_monotone_and_hits_the_target_rate():
    rng = np.random.default_rng(1)
    s = rng.normal(size=(1000, 10)) * 2
    y = rng.integers(0, 10, 1000)
    cal = calibrate(s, np.eye(10)[y] * 5, y, target_delegation_rate=0.3, cost_student=0.05)
    rates = [r.delegation_rate for r in cal.table]
    assert rates == sorted(rates) and len(set(rates)) == len(rates)
    thresholds = [r.threshold for r in cal.table]
    assert thresholds == sorted(thresholds)
    margins = top2_margin(softmax(s))
    assert (margins < cal.threshold).mean() == pytest.approx(0.3, abs=0.01)


def test_cascade_accuracy_and_cost_are_computed_from_the_decisions():
    # Student right on its confident half, wrong on the unsure half; teacher always right.
    y = np.zeros(4, dtype=int)
    s = np.array([[5.0, 0.0], [4.0, 0.0], [0.0, 0.1], [0.0, 0.2]])
    t = np.array([[9.0, 0.0]] * 4)
    cal = calibrate(s, t, y, target_delegation_rate=0.5, cost_student=0.1, steps=4)
    assert cal.student_accuracy == 0.5 and cal.teacher_accuracy == 1.0
    row = next(r for r in cal.table if r.delegation_rate == 0.5)
    assert row.cascade_accuracy == 1.0
    assert row.expected_cost == pytest.approx(0.1 + 0.5 * 1.0)
    first = cal.table[0]
    assert (first.delegation_rate, first.cascade_accuracy) == (0.0, 0.5)


def test_class_based_delegation_sets_a_floor_on_the_rate():
    rng = np.random.default_rng(2)
    s = rng.normal(size=(400, 4)) * 3
    y = rng.integers(0, 4, 400)
    in_domain = np.array([True, True, False, False])
    cal = calibrate(
        s,
        np.eye(4)[y] * 5,
        y,
        target_delegation_rate=0.1,
        cost_student=0.1,
        policy=OutputPolicy(in_domain_outputs=in_domain),
    )
    forced = (~in_domain[s.argmax(1)]).mean()
    assert cal.table[0].delegation_rate == pytest.approx(forced)
    assert cal.threshold == 0.0  # the target is below the floor: delegate only the forced ones


def test_threshold_for_a_target_accuracy():
    rng = np.random.default_rng(3)
    s = rng.normal(size=(500, 5)) * 2
    y = rng.integers(0, 5, 500)
    cal = calibrate(
        s, np.eye(5)[y] * 5, y, target_delegation_rate=None, target_accuracy=0.9, cost_student=0.1
    )
    row = next(r for r in cal.table if r.threshold == cal.threshold)
    assert row.cascade_accuracy >= 0.9
    assert all(
        r.cascade_accuracy < 0.9 for r in cal.table if r.delegation_rate < row.delegation_rate
    )
    with pytest.raises(ValueError, match="no threshold reaches"):
        cal.threshold_for_accuracy(1.01)


def test_stage_calibration_passes_the_same_share_at_each_stage():
    from cascade_server.train.stages import calibrate_stages

    rng = np.random.default_rng(4)
    stages = [rng.normal(size=(2000, 10)) * (k + 1) for k in range(3)]
    out = calibrate_stages(stages, 0.125, ["stage_1", "stage_2", "stage_3"])
    assert [s.output for s in out] == ["stage_1", "stage_2", "stage_3"]
    for s in out:
        assert s.pass_rate == pytest.approx(0.5, abs=0.02)  # 0.5^3 = 0.125 reach the teacher


def _informative(n=2000, seed=0):
    """A student whose errors concentrate at low margins, and a perfect teacher."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    confidence = rng.uniform(0, 6, n)
    student = rng.normal(size=(n, 4))
    right = rng.uniform(size=n) < 0.5 + confidence / 12  # surer is righter
    student[np.arange(n), np.where(right, labels, (labels + 1) % 4)] += confidence
    teacher = np.eye(4)[labels] * 10
    return student, teacher, labels


def test_rows_count_what_the_student_answers_alone_and_its_errors():
    student, teacher, labels = _informative()
    cal = calibrate(student, teacher, labels, target_delegation_rate=0.2, cost_student=0.1)
    margins = top2_margin(softmax(student))
    wrong = student.argmax(1) != labels
    for row in cal.table[1:-1:10]:
        kept = margins >= row.threshold
        assert row.accepted == kept.sum()
        assert row.accepted_errors == (kept & wrong).sum()
        assert row.accepted_disagreements == row.accepted_errors  # the teacher is the labels


def test_max_student_error_tests_from_the_highest_threshold_down_and_stops_at_a_failure():
    from cascade_server.bundle import clopper_pearson_upper

    student, teacher, labels = _informative()
    cal = calibrate(student, teacher, labels, target_delegation_rate=0.2, cost_student=0.1)
    t = cal.threshold_for_student_error(0.15)
    rows = [r for r in cal.table if r.accepted]

    def passes(r):
        return clopper_pearson_upper(r.accepted_errors, r.accepted) <= 0.15

    # The sequence: rows with items enough that half the bound's error rate would pass
    # (chosen on the margins alone), highest threshold first.
    sequence = sorted(
        (
            r
            for r in rows
            if clopper_pearson_upper(math.ceil(r.accepted * 0.075), r.accepted) <= 0.15
        ),
        key=lambda r: -r.threshold,
    )
    assert len(sequence) < len(rows)  # the highest thresholds leave too few items to test
    at = next(i for i, r in enumerate(sequence) if r.threshold == t)
    assert all(passes(r) for r in sequence[: at + 1])  # every row tested so far passed
    assert at + 1 == len(sequence) or not passes(sequence[at + 1])  # and the next one fails
    # Lower thresholds past that first failure may pass again: they are not chosen (that would
    # be the best of many tries, not a 95% bound).
    # The bound is stricter than the point estimate: with a looser target, a lower threshold.
    assert cal.threshold_for_student_error(0.3) <= t


def test_an_unreachable_student_error_is_refused_naming_the_best():
    student, teacher, labels = _informative()
    cal = calibrate(student, teacher, labels, target_delegation_rate=0.2, cost_student=0.1)
    with pytest.raises(ValueError, match=r"the best it can do is 0\.\d+, at threshold"):
        cal.threshold_for_student_error(0.0001)
