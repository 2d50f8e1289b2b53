"""Every threshold of an N-stage cascade at once: the grid's counts against a loop over the
settings, the Pareto frontier, the row picked for a target, and the two-stage case against the
calibration table."""

import itertools
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cascade_server.bundle import Frontier, FrontierRow
from cascade_server.policy import decide
from cascade_server.train.records import OutputPolicy
from cascade_server.train.stages import cascade_rows, choose_row, frontier, grid_counts
from cascade_server.train.stages.frontier import pass_rates


def cascade(n=300, classes=4, stages=3, seed=0):
    """Stages that get surer and righter further on, and a teacher right on 90%."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    logits = [rng.normal(size=(n, classes)) + np.eye(classes)[y] * k for k in range(stages)]
    teacher = np.eye(classes)[np.where(rng.uniform(size=n) < 0.9, y, (y + 1) % classes)] * 4
    return logits, teacher, y


def brute(logits, teacher, y, costs, thresholds, policy):
    """Each setting by following every item through the stages."""
    n = len(y)
    first = policy.decide(logits[0], 0.0)
    margins = [first.margins] + [decide(s, 0.0).margins for s in logits[1:]]
    forced = [first.forced] + [np.zeros(n, bool)] * (len(logits) - 1)
    said = [policy.predictions(logits[0], teacher.shape[1])] + [s.argmax(1) for s in logits[1:]]
    out = {}
    for js in itertools.product(*(range(len(t)) for t in thresholds)):
        left, correct, agreeing, spend, answered = np.ones(n, bool), 0, 0, 0.0, []
        for k, j in enumerate(js):
            spend += costs[k] * left.sum()
            keep = left & ~forced[k] & (margins[k] >= thresholds[k][j])
            correct += (keep & (said[k] == y)).sum()
            agreeing += (keep & (said[k] == teacher.argmax(1))).sum()
            answered.append(int(keep.sum()))
            left &= ~keep
        correct += (left & (teacher.argmax(1) == y)).sum()
        agreeing += left.sum()  # the teacher's own answers
        answered.append(int(left.sum()))
        out[js] = (int(correct), answered, (spend + left.sum()) / n, int(agreeing))
    return out


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_grid_counts_every_setting_as_a_loop_over_items_does(stages):
    logits, teacher, y = cascade(stages=stages)
    costs = [0.05, 0.2, 0.4][:stages]
    # Class-based delegation at stage 0: outputs 2 and 3 always move on.
    policy = OutputPolicy(in_domain_outputs=np.array([True, True, False, False]))
    g = grid_counts(logits, teacher, y, costs, grid=6, policy=policy)
    for js, (correct, answered, cost, agreeing) in brute(
        logits, teacher, y, costs, g.thresholds, policy
    ).items():
        assert g.correct[js] == correct
        assert g.agreeing[js] == agreeing
        assert [int(a[js]) for a in g.answered] == answered
        assert g.cost[js] == pytest.approx(cost)


def test_the_frontier_is_every_setting_no_other_beats():
    logits, teacher, y = cascade()
    costs = [0.05, 0.2, 0.4]
    g = grid_counts(logits, teacher, y, costs, grid=7)
    points = list(zip(g.cost.ravel(), g.correct.ravel(), strict=True))
    undominated = {
        (c, a)
        for c, a in points
        if not any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for c2, a2 in points)
    }
    f = frontier(logits, teacher, y, costs, grid=7)
    assert {(r.expected_cost, round(r.cascade_accuracy * len(y))) for r in f.rows} == {
        (c, int(a)) for c, a in undominated
    }
    assert f.split == "val" and f.n == len(y)
    for row in f.rows:
        assert len(row.thresholds) == 3 and len(row.answered) == 4
        assert sum(row.answered) == pytest.approx(1.0)


def test_the_ends_of_the_frontier_are_the_student_alone_and_everything_onwards():
    logits, teacher, y = cascade()
    f = frontier(logits, teacher, y, [0.05, 0.2, 0.4], grid=11)
    cheapest = f.rows[0]
    assert cheapest.expected_cost == pytest.approx(0.05)  # the student answers everything
    assert cheapest.answered[0] == 1.0
    assert cheapest.cascade_accuracy == pytest.approx((logits[0].argmax(1) == y).mean())


def test_for_accuracy_and_for_cost_pick_the_right_rows():
    def row(cost, acc):
        return FrontierRow(
            thresholds=(cost, 0.5),
            answered=(0.5, 0.5 - cost / 2, cost / 2),
            cascade_accuracy=acc,
            expected_cost=cost,
        )

    f = Frontier(split="val", n=100, rows=(row(0.1, 0.8), row(0.2, 0.85), row(0.4, 0.9)))
    assert f.for_accuracy(0.84).expected_cost == 0.2  # the cheapest reaching it
    assert f.for_accuracy(0.85).expected_cost == 0.2  # reaching includes equal
    assert f.for_accuracy(0.5).expected_cost == 0.1
    with pytest.raises(ValueError, match=r"best 0\.9000"):
        f.for_accuracy(0.95)
    assert f.for_cost(0.39).cascade_accuracy == 0.85  # the most accurate within it
    assert f.for_cost(0.4).cascade_accuracy == 0.9
    assert f.for_cost(10).cascade_accuracy == 0.9
    with pytest.raises(ValueError, match=r"cheapest 0\.1000"):
        f.for_cost(0.05)
    # The teacher's load as the target: the most accurate row sending at most that share on.
    assert choose_row(f, teacher_rate=0.1).expected_cost == 0.2
    assert choose_row(f, teacher_rate=0.01).expected_cost == 0.1  # none: the lowest share
    with pytest.raises(ValueError, match="one of"):
        choose_row(f, target_accuracy=0.8, cost_budget=0.3)


def test_pass_rates_are_shares_of_what_reaches_each_stage():
    row = FrontierRow(
        thresholds=(0.3, 0.2, 0.1),
        answered=(0.5, 0.25, 0.125, 0.125),
        cascade_accuracy=0.9,
        expected_cost=0.3,
    )
    assert pass_rates(row) == pytest.approx([0.5, 0.5, 0.5])


def test_bad_inputs_are_refused():
    logits, teacher, y = cascade(stages=2)
    with pytest.raises(ValueError, match="2 stages need 2 costs"):
        frontier(logits, teacher, y, [0.1])
    with pytest.raises(ValueError, match="stage 1 answers"):
        frontier([logits[0], logits[1][:, :3]], teacher, y, [0.1, 0.2])
    with pytest.raises(ValueError, match="too large"):
        frontier(logits * 3, teacher, y, [0.1] * 6, grid=41)


def test_three_stages_of_ten_thousand_items_take_well_under_a_second_or_so():
    logits, teacher, y = cascade(n=10_000, classes=10, stages=3)
    started = time.perf_counter()
    f = frontier(logits, teacher, y, [0.05, 0.1, 0.3], grid=41)
    assert time.perf_counter() - started < 5.0  # ~0.05 s measured on 2 CPU cores
    assert len(f.rows) > 10


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    stages=st.integers(1, 3),
    classes=st.integers(2, 5),
    n=st.integers(5, 300),
    costs=st.lists(st.floats(0.0, 0.5), min_size=3, max_size=3),
)
def test_the_frontier_rises_in_cost_and_accuracy_together(seed, stages, classes, n, costs):
    logits, teacher, y = cascade(n=n, classes=classes, stages=stages, seed=seed)
    f = frontier(logits, teacher, y, costs[:stages], grid=9)
    cost = [r.expected_cost for r in f.rows]
    acc = [r.cascade_accuracy for r in f.rows]
    assert cost == sorted(cost) and acc == sorted(acc)
    assert all(0.0 <= r.teacher_rate <= 1.0 for r in f.rows)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(5, 400),
    cost=st.floats(0.0, 0.5),
    steps=st.sampled_from([10, 20, 100]),
    forced=st.booleans(),
)
def test_one_stage_agrees_with_the_calibration_table(seed, n, cost, steps, forced):
    """Two-stage: each frontier row is a table row (same delegation rate, same accuracy) and no
    table row beats the frontier."""
    logits, teacher, y = cascade(n=n, classes=4, stages=1, seed=seed)
    policy = OutputPolicy(in_domain_outputs=np.array([True, True, True, False]) if forced else None)
    table = cascade_rows(logits[0], teacher, y, cost_student=cost, steps=steps, policy=policy)
    f = frontier(logits, teacher, y, [cost], grid=steps + 1, policy=policy)
    by_rate = {round(r.delegation_rate * n): r for r in table}
    for row in f.rows:
        match = by_rate[round(row.teacher_rate * n)]
        assert row.cascade_accuracy == pytest.approx(match.cascade_accuracy)
        assert row.expected_cost == pytest.approx(match.expected_cost)
        # The teacher's agreement: the grid's, and the table's counts say the same.
        assert match.accepted_disagreements is not None
        assert row.teacher_agreement == pytest.approx(1 - match.accepted_disagreements / n)
    for r in table:
        within = [x.cascade_accuracy for x in f.rows if x.expected_cost <= r.expected_cost + 1e-12]
        assert max(within) >= r.cascade_accuracy - 1e-12
