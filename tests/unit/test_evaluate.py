import numpy as np
import pytest

from cascade_server.bundle import CalibrationRow
from cascade_server.train.stages import evaluate_logits as evaluate
from cascade_server.train.stages import plot, summarize


def rows(points):
    return [
        CalibrationRow(threshold=r, delegation_rate=r, cascade_accuracy=a, expected_cost=r)
        for r, a in points
    ]


def test_summary_numbers():
    s = summarize(
        rows([(0.0, 0.80), (0.1, 0.86), (0.2, 0.895), (0.3, 0.90), (1.0, 0.90)]),
        student_acc=0.80,
        teacher_acc=0.90,
    )
    assert s["cascade_accuracy"] == pytest.approx({"0.1": 0.86, "0.2": 0.895, "0.3": 0.90})
    assert s["delegation_to_teacher_minus_0.5pt"] == 0.2
    assert s["gap_recovered"]["0.1"] == pytest.approx(0.6)
    assert s["auc"] == pytest.approx(
        _area([0.80, 0.86, 0.895, 0.90, 0.90], [0, 0.1, 0.2, 0.3, 1.0])
    )


def test_rates_below_the_forced_floor_are_not_reported():
    s = summarize(rows([(0.5, 0.85), (1.0, 0.9)]), student_acc=0.5, teacher_acc=0.9)
    assert s["cascade_accuracy"]["0.3"] is None and s["gap_recovered"]["0.3"] is None
    assert s["min_delegation_rate"] == 0.5


def test_evaluate_and_plot(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    ev = evaluate(rng.normal(size=(300, 3)), np.eye(3)[y] * 4, y, cost_student=0.1)
    assert ev["summary"]["teacher_accuracy"] == 1.0
    assert ev["rows"][-1]["cascade_accuracy"] == 1.0
    png = plot({"a": ev, "b": ev}, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_a_curve_that_stops_short_of_full_delegation_ends_at_the_teacher():
    s = summarize(rows([(0.0, 0.8), (0.5, 0.85)]), student_acc=0.8, teacher_acc=0.9)
    assert s["auc"] == pytest.approx(_area([0.8, 0.85, 0.9], [0.0, 0.5, 1.0]))


def _area(y, x):
    """The trapezoid rule written out: an oracle independent of numpy's trapz/trapezoid."""
    return sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(len(x) - 1))


def test_the_frontier_curves_and_their_plot(tmp_path):
    from cascade_server.train.stages import frontier_curves, plot_frontier

    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 400)
    stages = [rng.normal(size=(400, 3)) + np.eye(3)[y] * k for k in range(3)]
    teacher = np.eye(3)[y] * 4
    two = frontier_curves(stages[-1], teacher, y, cost_student=0.3)
    assert two["split"] == "test" and two["stages"] is None and two["teacher_accuracy"] == 1.0
    rows = two["two_stage"]["rows"]
    assert rows[0]["cost"] == pytest.approx(0.3) and rows[0]["teacher_share"] == 0.0
    # The two-stage curve is the table's undominated rows: same points as evaluate's.
    table = {(r["delegation_rate"], r["cascade_accuracy"]) for r in evaluate(
        stages[-1], teacher, y, cost_student=0.3
    )["rows"]}  # fmt: skip
    assert all((r["teacher_share"], r["accuracy"]) in table for r in rows)
    many = frontier_curves(
        stages[-1], teacher, y, cost_student=0.3, stages=stages, stage_costs=[0.1, 0.1, 0.1]
    )
    assert many["stages"]["names"] == ["stage_1", "stage_2", "stage_3"]
    assert many["stages"]["costs"] == [0.1, 0.1, 0.1, 1.0]
    for row in many["stages"]["rows"]:
        assert len(row["thresholds"]) == 3 and len(row["answered"]) == 4
    costs = [r["cost"] for r in many["stages"]["rows"]]
    accs = [r["accuracy"] for r in many["stages"]["rows"]]
    assert costs == sorted(costs) and accs == sorted(accs)
    png = plot_frontier({"a": {"frontier": two}, "b": {"frontier": many}}, tmp_path / "f.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
