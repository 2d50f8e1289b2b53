import numpy as np
import pytest

from cascade_server.policy import softmax, top2_margin
from cascade_server.train.calibrate import calibrate


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
