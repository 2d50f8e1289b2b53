"""The one routing decision per item, on numpy arrays: who answers and why."""

import numpy as np

from cascade_server.gateway.outcomes import BY_TEACHER, DEGRADED, DELEGATED, Outcome
from cascade_server.gateway.routing import Load, Mode, route

MARGINS = np.array([0.9, 0.05, 0.5, 0.2, 0.95, 0.1])
WANTED = MARGINS < 0.6  # items 1, 2, 3, 5


def names(outcomes):
    return [Outcome(o).name.lower() for o in outcomes]


def test_without_a_bound_every_wanted_item_goes_to_the_teacher():
    r = route(MARGINS, WANTED, Load())
    assert r.send.tolist() == [1, 2, 3, 5]
    assert names(r.outcome) == ["confident", "delegated", "delegated", "delegated",
                                "confident", "delegated"]  # fmt: skip
    assert not r.shed.any()


def test_with_room_for_k_the_k_lowest_margins_go_and_the_rest_are_kept_busy():
    r = route(MARGINS, WANTED, Load(room=2))
    assert r.send.tolist() == [1, 5]  # margins 0.05 and 0.1
    assert names(r.outcome[[2, 3]]) == ["teacher_busy", "teacher_busy"]
    assert not DEGRADED[r.outcome].any()  # busy is not a teacher failure
    assert DELEGATED[r.outcome].tolist() == WANTED.tolist()  # still counted as delegated


def test_an_open_circuit_degrades_every_wanted_item_and_sends_nothing():
    r = route(MARGINS, WANTED, Load(room=0, circuit_open=True))
    assert r.send.size == 0
    assert (r.outcome[WANTED] == Outcome.CIRCUIT_OPEN).all()
    assert DEGRADED[r.outcome].tolist() == WANTED.tolist()


def test_below_the_accuracy_floor_items_that_find_no_room_are_shed():
    r = route(MARGINS, WANTED, Load(room=1, floor_threshold=0.3))
    assert r.send.tolist() == [1]
    assert r.shed.tolist() == [False, False, False, True, False, True]  # 0.2 and 0.1 < 0.3


def test_a_deadline_shorter_than_the_teachers_p95_skips_it():
    budget = np.array([np.inf, 0.001, 1.0, np.inf, np.inf, 0.001])
    r = route(MARGINS, WANTED, Load(p95_s=0.01), budget_s=budget)
    assert r.send.tolist() == [2, 3]
    assert names(r.outcome[[1, 5]]) == ["deadline", "deadline"]
    assert not BY_TEACHER[r.outcome[[1, 5]]].any()


def test_request_modes_force_either_way_and_forced_items_go_first():
    mode = np.array([Mode.ALWAYS, Mode.NEVER, 0, 0, 0, 0])
    r = route(MARGINS, WANTED, Load(room=2), mode=mode)
    assert r.outcome[0] == Outcome.FORCED_TEACHER and r.outcome[1] == Outcome.FORCED_STUDENT
    assert r.send.tolist() == [0, 5]  # the forced item, then the lowest margin left
    assert names(r.outcome[[2, 3]]) == ["teacher_busy", "teacher_busy"]
