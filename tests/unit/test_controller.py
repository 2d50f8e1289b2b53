"""The delegation controller on scripted margin streams, over a real (file) control store:
convergence to the target, bounds, bounded steps, hysteresis, a shift, several workers."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest

from cascade_server.config.delegation import ControllerConfig
from cascade_server.gateway.control import PolicyState
from cascade_server.gateway.controller import Controller
from cascade_server.gateway.metrics import Metrics
from cascade_server.gateway.stores import ControlStore, FileBackend

from .test_bundle import make_calibration

CAL = make_calibration()
# The same table without the per-threshold counts: the error mode then holds the operator's
# bound itself live (with them, the calibration's disagreement at the start; see live_target).
NO_COUNTS = CAL.model_copy(
    update={
        "table": tuple(
            r.model_copy(
                update={"accepted": None, "accepted_errors": None, "accepted_disagreements": None}
            )
            for r in CAL.table
        )
    }
)


def controller(tmp_path, name="c", **knobs):
    config = ControllerConfig(**{"interval_s": 0.01, "min_items": 100, **knobs})
    store = ControlStore(FileBackend(tmp_path), timeout_s=2.0)
    c = Controller(name, config, store, Metrics(), strata=10)
    c.me = f"worker-{id(c)}"  # several controllers in one process stand for several workers
    return c


def policy(target=0.2, **fields):
    """An admin's online policy for student v1: a target rate by default."""
    base = {"mode": "target_delegation_rate", "threshold": 0.5, "target_delegation_rate": target}
    return PolicyState(
        **{**base, "source": "admin", "student_version": "v1", "updated_at": "t0", **fields}
    )


def feed(c: Controller, margins: np.ndarray) -> None:
    threshold = c.threshold_for(POLICY)
    c.window.routed(margins, int((margins < threshold).sum()))


POLICY = policy()


def run_steps(c, margins_of_step, steps, pol=POLICY):
    thresholds = []

    async def main():
        for k in range(steps):
            feed(c, margins_of_step(k))
            await asyncio.sleep(0.01)  # the shared state is due again
            await c.step(pol, CAL)
            thresholds.append(c.threshold_for(pol))

    asyncio.run(main())
    return thresholds


def test_it_converges_to_the_margin_quantile_of_the_target(tmp_path):
    rng = np.random.default_rng(0)
    c = controller(tmp_path)
    ts = run_steps(c, lambda k: rng.beta(2, 1, 200), 30)
    expected = np.quantile(rng.beta(2, 1, 200_000), 0.2)
    assert ts[-1] == pytest.approx(expected, abs=0.02)
    assert c.merged.delegation_rate == pytest.approx(0.2, abs=0.03)


def test_moves_are_bounded_per_step_and_by_the_policy(tmp_path):
    rng = np.random.default_rng(1)
    c = controller(tmp_path, max_step=0.05)
    ts = run_steps(c, lambda k: rng.uniform(0.0, 1.0, 300), 12)
    steps = np.abs(np.diff([0.5, *ts]))
    assert steps.max() <= 0.05 + 1e-9
    bounded = policy(min_threshold=0.35, max_threshold=0.6)
    c2 = controller(tmp_path / "b", max_step=0.05)
    ts2 = run_steps(c2, lambda k: rng.uniform(0.0, 1.0, 300), 20, bounded)
    assert min(ts2) >= 0.35 - 1e-9 and ts2[-1] == pytest.approx(0.35)


def test_hysteresis_keeps_a_steady_stream_from_flapping(tmp_path):
    rng = np.random.default_rng(2)
    c = controller(tmp_path, min_change=0.01)
    ts = run_steps(c, lambda k: rng.beta(2, 1, 300), 40)
    settled = ts[15:]
    moves = sum(1 for a, b in itertools.pairwise(settled) if a != b)
    assert moves <= 2, settled


def test_a_shift_in_the_mix_is_followed_within_the_window(tmp_path):
    """Easy traffic, then hard traffic: the threshold goes to the new quantile once the old
    items have left the window (window_items), not later."""
    rng = np.random.default_rng(3)
    c = controller(tmp_path, window_items=1000, buckets=10, max_step=0.2)
    ts = run_steps(c, lambda k: rng.beta(4, 1, 100) if k < 30 else rng.beta(1.5, 1, 100), 60)
    before = np.quantile(rng.beta(4, 1, 200_000), 0.2)
    after = np.quantile(rng.beta(1.5, 1, 200_000), 0.2)
    assert ts[29] == pytest.approx(before, abs=0.03)
    # 1,000 items of window = 10 steps of 100: within 15 steps of the shift, at the new target.
    assert ts[45] == pytest.approx(after, abs=0.03)


def test_two_workers_merge_their_windows_and_move_once_per_interval(tmp_path):
    rng = np.random.default_rng(4)
    # b steps right after a: within the interval (0.8 of it, 0.4 s) even on a loaded machine.
    a, b = controller(tmp_path, interval_s=0.5), controller(tmp_path, interval_s=0.5)

    async def main():
        for _ in range(5):
            feed(a, rng.uniform(0, 0.5, 200))  # a sees low margins, b high ones
            feed(b, rng.uniform(0.5, 1.0, 200))
            await asyncio.sleep(0.51)
            await a.step(POLICY, CAL)
            await b.step(POLICY, CAL)  # right after a: the shared state is not due yet

    asyncio.run(main())
    assert a.merged.workers == 2 and b.merged.workers == 2
    assert b.merged.items == 2000  # both windows of 1,000 items
    # The merged 20% quantile of U(0,0.5) + U(0.5,1) is 0.2, which neither alone would give;
    # b found the state a had just written (not due): one move per interval, one threshold.
    assert a.threshold_for(POLICY) == b.threshold_for(POLICY)
    assert a.threshold_for(POLICY) == pytest.approx(0.2, abs=0.03)
    # One write per interval, all a's: b, stepping right after it, wrote none.
    assert a.state() is not None and a.state().step == 5


def test_a_worker_deciding_on_a_stale_step_makes_no_write(tmp_path):
    """Two workers find the state due at once (b has not seen a's write when it decides): the
    compare-and-set on the step counter keeps a's move, and b's is dropped."""
    rng = np.random.default_rng(11)
    a, b = controller(tmp_path, interval_s=0.2), controller(tmp_path, interval_s=0.2)

    async def main():
        feed(a, rng.uniform(0, 1, 300))
        await a.step(POLICY, CAL)
        stale = b.state()
        assert stale is not None and stale.step == 1
        await asyncio.sleep(0.21)
        feed(a, rng.uniform(0, 0.3, 300))
        await a.step(POLICY, CAL)
        written = (tmp_path / f"{a.key}.json").read_bytes()
        assert a.state().step == 2
        b.state = lambda: stale  # b decides from the state before a's second step
        feed(b, rng.uniform(0.7, 1.0, 300))  # and would move elsewhere
        await b.step(POLICY, CAL)
        assert (tmp_path / f"{a.key}.json").read_bytes() == written

    asyncio.run(main())


def test_items_delegated_by_class_take_their_share_of_the_target_first(tmp_path):
    """A fifth of the traffic is delegated whatever the threshold: with a target of 40% the
    threshold delegates a quarter of the rest, (0.4 - 0.2) / (1 - 0.2), so the teacher's
    share is the target and not 0.2 + 0.4."""
    rng = np.random.default_rng(12)
    c = controller(tmp_path, window_items=5000)  # a window large enough to pin 0.25 to 0.03
    target = policy(target=0.4)

    def feed_forced(margins):
        t = c.threshold_for(target)
        forced = len(margins) // 4  # 20% of all items
        c.window.routed(margins, int((margins < t).sum()) + forced, forced)

    async def main():
        for _ in range(30):
            feed_forced(rng.uniform(0, 1, 2000))
            await asyncio.sleep(0.01)
            await c.step(target, CAL)

    asyncio.run(main())
    assert c.threshold_for(target) == pytest.approx(0.25, abs=0.03)
    assert c.merged.forced_rate == pytest.approx(0.2)
    assert c.merged.delegation_rate == pytest.approx(0.4, abs=0.03)


def test_a_class_share_above_the_target_takes_the_threshold_to_its_floor(tmp_path):
    c = controller(tmp_path, max_step=1.0)
    target = policy(target=0.1)

    async def main():
        for _ in range(3):
            margins = np.linspace(0.01, 0.99, 300)
            c.window.routed(margins, 100, 100)  # a quarter forced, above the 10% target
            await asyncio.sleep(0.01)
            await c.step(target, CAL)

    asyncio.run(main())
    assert c.threshold_for(target) == 0.0
    assert "delegated by class alone" in c.state().reason


def test_replicas_on_two_student_versions_keep_their_own_state(tmp_path):
    """Around a rollout (or with a replica stuck on the old version), each version's workers
    step their own state: neither restarts the other from its start every interval."""
    rng = np.random.default_rng(14)
    a, b = controller(tmp_path), controller(tmp_path)
    a.reset("v1")
    b.reset("v2")
    pol_a, pol_b = POLICY, POLICY.model_copy(update={"student_version": "v2"})

    async def main():
        for _ in range(6):
            feed(a, rng.uniform(0, 1, 300))
            feed(b, rng.uniform(0, 1, 300))
            await asyncio.sleep(0.01)
            await a.step(pol_a, CAL)
            await b.step(pol_b, CAL)

    asyncio.run(main())
    assert a.key != b.key
    assert a.state().step == 6 and b.state().step == 6
    assert a.threshold_for(pol_a) != pol_a.threshold  # both were moved from their starts


def test_a_new_student_version_starts_an_empty_window_and_ignores_the_olds(tmp_path):
    """After a swap the window restarts, and a worker still on the old version (not flipped
    yet) is left out of the merge: its margins are another model's."""
    rng = np.random.default_rng(13)
    a, b = controller(tmp_path), controller(tmp_path)
    a.reset("v1")
    b.reset("v1")

    async def main():
        feed(a, rng.uniform(0, 1, 300))
        feed(b, rng.uniform(0, 1, 300))
        await a.step(POLICY, CAL)
        await b.step(POLICY, CAL)
        assert b.merged.workers == 2 and b.merged.items == 600
        a.reset("v2")  # a flipped to the new student; b has not yet
        assert a.merged.items == 0 and a.window.roll().items == 0
        feed(a, rng.uniform(0, 1, 100))
        await asyncio.sleep(0.01)
        await a.step(POLICY, CAL)
        assert a.merged.workers == 1 and a.merged.items == 100  # b's v1 window left out

    asyncio.run(main())


def test_a_fixed_threshold_is_never_moved(tmp_path):
    rng = np.random.default_rng(5)
    c = controller(tmp_path)
    fixed = PolicyState(threshold=0.42, source="admin", student_version="v1")
    ts = run_steps(c, lambda k: rng.uniform(0, 1, 300), 5, fixed)
    assert ts == [0.42] * 5
    assert c.state() is None  # nothing written for a fixed policy


def test_a_new_policy_starts_from_its_own_start_not_the_old_moves(tmp_path):
    rng = np.random.default_rng(6)
    c = controller(tmp_path)
    run_steps(c, lambda k: rng.uniform(0, 1, 300), 10)
    assert c.threshold_for(POLICY) != 0.5
    newer = POLICY.model_copy(update={"updated_at": "t1", "threshold": 0.7})
    assert c.threshold_for(newer) == 0.7


def _error_policy(target=0.1):
    return policy(
        mode="max_student_error",
        threshold=0.3,
        target_delegation_rate=None,
        max_student_error=target,
    )


def _shadows(c: Controller, rng, n: int, error_of_margin) -> None:
    """n student answers with margins in [0.3, 1], each shadowed, disagreeing with the teacher
    with probability error_of_margin(margin)."""
    margins = rng.uniform(0.3, 1.0, n)
    c.window.answered(margins, 0)
    c.window.shadowed(margins, rng.uniform(size=n) >= error_of_margin(margins))


def test_max_student_error_rises_on_evidence_and_returns_when_it_fits(tmp_path):
    rng = np.random.default_rng(7)
    c = controller(tmp_path, max_step=0.2)
    c.window.stratified = True
    pol = _error_policy(0.1)
    seen = []

    async def steps(k, error_of_margin):
        for _ in range(k):
            _shadows(c, rng, 400, error_of_margin)
            await asyncio.sleep(0.01)
            await c.step(pol, NO_COUNTS)
            seen.append(c.threshold_for(pol))

    # Errors concentrated below 0.6: 30% there, 2% above. Live error above 0.3 is ~0.14 > 0.1;
    # above 0.4 it is ~0.11, above 0.5 ~0.08: 0.5 is the lowest stratum edge that fits.
    asyncio.run(steps(8, lambda m: np.where(m < 0.6, 0.3, 0.02)))
    assert seen[-1] == pytest.approx(0.5)
    assert max(np.diff([0.3, *seen])) <= 0.2 + 1e-9
    # The traffic heals: errors of 2% everywhere, clearly within. Down half a step after ten
    # steps in a row within (counted from the raised phase too: above 0.5 the error was
    # ~0.08), then ten more before the next half step, to the start and no further.
    raised = len(seen)
    asyncio.run(steps(40, lambda m: np.full_like(m, 0.02)))
    healed = seen[raised:]
    first = next(i for i, t in enumerate(healed) if t < 0.5 - 1e-9)
    second = next(i for i, t in enumerate(healed) if t < 0.4 - 1e-9)
    assert healed[first] == pytest.approx(0.4) and healed[second] == pytest.approx(0.3)
    assert second - first >= 10  # each half step waits for ten steps of evidence
    assert min(healed) == pytest.approx(0.3) and healed[-1] == pytest.approx(0.3)


def test_max_student_error_holds_when_the_evidence_is_unclear(tmp_path):
    rng = np.random.default_rng(8)
    c = controller(tmp_path)
    c.window.stratified = True
    pol = _error_policy(0.1)

    async def main():
        for _ in range(10):
            _shadows(c, rng, 60, lambda m: np.full_like(m, 0.08))  # below, not clearly
            await asyncio.sleep(0.01)
            await c.step(pol, NO_COUNTS)

    asyncio.run(main())
    assert c.threshold_for(pol) == 0.3


def test_the_live_error_target_is_the_calibrations_disagreement_at_the_start():
    from cascade_server.gateway.controller import live_target

    pol = _error_policy(0.1).model_copy(update={"threshold": CAL.table[30].threshold})
    row = CAL.accepted_at(pol.threshold)
    assert live_target(pol, CAL) == pytest.approx(row.accepted_disagreements / row.accepted)
    assert live_target(pol, NO_COUNTS) == 0.1


def test_per_stage_answers_travel_between_workers_and_older_windows_still_merge():
    import orjson

    from cascade_server.gateway.window import Summary, Window

    config = ControllerConfig()
    window = Window(config, strata=4)
    window.reset("v1", stages=3)
    window.counting = True  # as while a cost budget is held
    window.answered_by(np.array([9, 9]))  # another version's two stages: not counted
    window.answered_by(np.array([5, 2, 1]))
    window.answered_by(np.array([1, 0, 3]))
    mine = window.roll()
    assert mine.stages.tolist() == [6, 2, 4]
    other = Summary.from_bytes(mine.to_bytes(), config.relative_accuracy, 4)
    assert other.stages.tolist() == [6, 2, 4]
    # A window from a gateway before per-stage counts: no "stages" key, merges as none.
    old = orjson.loads(mine.to_bytes())
    del old["stages"]
    older = Summary.from_bytes(orjson.dumps(old), config.relative_accuracy, 4)
    merged = Summary.empty(config.relative_accuracy, 4)
    for s in (other, older, other):
        merged.merge(s)
    assert merged.stages.tolist() == [12, 4, 8]


def _frontier_and_budget_policy(budget, start_row):
    from cascade_server.bundle import Frontier, FrontierRow

    # Four rows of a three-stage cascade, by cost (each more accurate than the cheaper ones).
    rows = tuple(
        FrontierRow(
            thresholds=(t, t),
            answered=(1 - t, t / 2, t / 2),
            cascade_accuracy=0.9 + t / 10,
            expected_cost=cost,
        )
        for t, cost in ((0.1, 0.1), (0.3, 0.2), (0.5, 0.3), (0.7, 0.4))
    )
    row = rows[start_row]
    pol = policy(
        mode="cost_budget",
        threshold=row.thresholds[0],
        target_delegation_rate=None,
        cost_budget=budget,
        tier_thresholds=row.thresholds[1:],
        min_threshold=0.6,  # bounds do not clamp whole rows
    )
    return Frontier(split="val", n=100, rows=rows), pol


COSTS = (0.1, 0.2, 1.0)  # student, tier, teacher: an item the teacher answers paid 1.3


def _hold_budget(tmp_path, start_row, steps, answers):
    """A controller holding a budget of 0.35 for `steps` intervals; `answers(cost)` gives the
    answers per stage of each interval from the calibrated cost of the row served. Returns
    (the controller, the (threshold, tiers) in force after each step)."""
    frontier, pol = _frontier_and_budget_policy(budget=0.35, start_row=start_row)
    c = controller(tmp_path, min_items=100)
    c.reset("v1", stages=3)
    thresholds = [r.thresholds for r in frontier.rows]
    served = []

    async def main():
        for _ in range(steps):
            here = (c.threshold_for(pol), *(c.tiers_for(pol) or pol.tier_thresholds))
            c.window.answered_by(answers(frontier.rows[thresholds.index(here)].expected_cost))
            await asyncio.sleep(0.01)
            await c.step(pol, CAL, frontier=frontier, costs=COSTS)
            served.append((c.threshold_for(pol), c.tiers_for(pol)))

    asyncio.run(main())
    return c, served


def test_a_cost_budget_moves_to_the_row_that_fits_then_waits_for_the_new_rows_traffic(tmp_path):
    def twice_as_dear(cost):  # live traffic twice as dear as calibrated: 0.8 at the row of 0.4
        teacher = round(100 * (2 * cost - 0.1) / 1.2)  # the rest answered by the student
        return np.array([100 - teacher, 0, teacher])

    c, served = _hold_budget(tmp_path, start_row=3, steps=6, answers=twice_as_dear)
    # Scale 2 at the row of 0.4: the most accurate row within 0.35 / 2 is the row of 0.1 ...
    assert served[0] == (0.1, (0.1,))
    # ... where the old row's answers are forgotten and a dearer row is not tried at once.
    assert all(s == (0.1, (0.1,)) for s in served[1:])
    state = c.state()
    assert state is not None and state.live_cost is not None and state.live_cost <= 0.35 * 1.01


def test_a_cost_budget_comes_back_one_row_at_a_time_when_traffic_is_cheaper(tmp_path):
    # 0.1 per item whatever the row: at the row of 0.1 every row up to 0.3 fits, and each
    # row dearer is cheaper still against its calibration.
    _, steps = _hold_budget(tmp_path, 0, 25, answers=lambda cost: np.array([100, 0, 0]))
    served = [threshold for threshold, _ in steps]
    assert served[0] == 0.1  # held at first
    ups = [b for a, b in itertools.pairwise(served) if b != a]
    assert ups[:2] == [0.3, 0.5]  # one row at a time, never straight to the dearest that fits
    assert served.index(ups[0]) >= 9  # after ten steps that said a dearer row fits


def test_a_new_cost_budget_starts_its_own_count(tmp_path):
    """Budget A held (cheap traffic: it holds its row), then budget B set: B's first step
    does not read A's traffic, though the stored state is still A's."""
    frontier, a = _frontier_and_budget_policy(budget=0.35, start_row=0)
    b = a.model_copy(update={"cost_budget": 0.3, "updated_at": "t1"})
    c = controller(tmp_path, min_items=100)
    c.reset("v1", stages=3)
    counted = []

    async def main():
        for pol in (a, a, b):
            c.threshold_for(pol)
            c.window.answered_by(np.array([100, 0, 0]))
            await asyncio.sleep(0.01)
            await c.step(pol, CAL, frontier=frontier, costs=COSTS)
            counted.append(float(c.merged.stages.sum()))

    asyncio.run(main())
    assert counted[:2] == [100, 200]  # A's intervals, held on its row
    assert counted[2] == 0  # B starts afresh


# target_accuracy: a two-stage cascade whose student's disagreement with the teacher falls with
# its margin stratum (0.2 in the lowest, 0.02 in the highest), items spread evenly over the
# strata. A row's threshold t leaves strata >= 10 t to the student, the rest to the teacher.
_DISAGREE = 0.2 * (1 - np.arange(10) / 10)
_ROW_T = (0.2, 0.4, 0.6, 0.8)


def _accuracy_frontier_and_policy(start_row, agreement=True):
    from cascade_server.bundle import Frontier, FrontierRow

    rows = tuple(
        FrontierRow(
            thresholds=(t,),
            answered=(1 - t, t),
            cascade_accuracy=0.9 + t / 10,
            expected_cost=0.05 + t,
            # 0.928, 0.958, 0.98, 0.994
            teacher_agreement=1 - _DISAGREE[round(t * 10) :].sum() / 10 if agreement else None,
        )
        for t in _ROW_T
    )
    row = rows[start_row]
    pol = policy(
        mode="target_accuracy",
        threshold=row.thresholds[0],
        target_delegation_rate=None,
        # Half way from the row before: the row reaches it with room (0.943 in agreement).
        target_accuracy=row.cascade_accuracy - 0.01,
    )
    return Frontier(split="val", n=1000, rows=rows), pol


def _hold_accuracy(tmp_path, start_row, steps, harder, agreement=True, **knobs):
    """A controller holding the target accuracy of row `start_row` for `steps` intervals of
    300 items each, live disagreement `harder` times the calibration's in every stratum, a
    fifth of the student's answers shadowed. Returns (the controller, the threshold in force
    after each step)."""
    frontier, pol = _accuracy_frontier_and_policy(start_row, agreement)
    c = controller(tmp_path, **{"min_items": 100, "window_items": 1000, **knobs})
    c.reset("v1", stages=2)
    c.window.stratified = True  # as with shadow samples on
    rng = np.random.default_rng(0)
    served = []

    async def main():
        for _ in range(steps):
            t = c.threshold_for(pol)
            margins = np.repeat((np.arange(10) + 0.5) / 10, 30)
            own = margins >= t
            c.window.routed(margins, int((~own).sum()))
            c.window.answered(margins[own], int((~own).sum()))
            c.window.answered_by(np.array([own.sum(), (~own).sum()]))
            kept = margins[own][rng.random(own.sum()) < 0.2]  # a 20% shadow share
            odds = harder * _DISAGREE[(kept * 10).astype(int)]
            c.window.shadowed(kept, rng.random(kept.size) >= odds, np.zeros(kept.size, int))
            await asyncio.sleep(0.01)
            await c.step(pol, CAL, frontier=frontier, costs=(0.05, 1.0))
            served.append(c.threshold_for(pol))

    asyncio.run(main())
    return c, served


def test_a_target_accuracy_moves_dearer_at_once_when_live_traffic_is_harder(tmp_path):
    c, served = _hold_accuracy(tmp_path, start_row=1, steps=12, harder=2.5)
    # 2.5 times the calibration's disagreement at the row of 0.958 (1.8 times the target's:
    # 0.943 agreement, 0.057 disagreement): the target holds live only on a row calibrated at
    # <= 0.023, the row of 0.6 (0.02) or dearer.
    moves = [b for a, b in itertools.pairwise([0.4, *served]) if b != a]
    assert len(moves) == 1 and moves[0] >= 0.6  # one move, at once, and it holds there
    assert served.index(moves[0]) <= 8  # as soon as a window's samples say so
    state = c.state()
    assert state is not None and state.target_agreement == pytest.approx(0.943)
    assert state.live_agreement is not None and state.live_agreement >= 0.943 - 0.01


def test_a_target_accuracy_comes_back_one_row_after_ten_steps_when_traffic_is_easier(tmp_path):
    _, served = _hold_accuracy(tmp_path, start_row=1, steps=40, harder=0.4)
    assert served[0] == 0.4
    moves = [b for a, b in itertools.pairwise(served) if b != a]
    assert moves == [0.2]  # one row cheaper, and the cheapest is the last
    assert served.index(0.2) >= 9  # after ten steps in which it fitted on the 95% bound


def test_coming_back_reads_the_evidence_horizon_not_the_window_alone(tmp_path):
    """The same easier traffic with the evidence horizon cut to the window (1,000 items,
    ~120 samples, a handful of them disagreeing): its 95% bound never says the cheaper row
    fits, and the threshold stays where a bound on 20,000 items brings it down."""
    _, served = _hold_accuracy(
        tmp_path, start_row=1, steps=40, harder=0.4, evidence_items=1000, evidence_s=60.0
    )
    assert set(served) == {0.4}


def test_a_target_accuracy_holds_its_row_while_live_traffic_is_as_calibrated(tmp_path):
    _, served = _hold_accuracy(tmp_path, start_row=1, steps=15, harder=1.0)
    assert set(served) == {0.4}


def test_a_frontier_without_teacher_agreement_is_not_held(tmp_path):
    c, served = _hold_accuracy(tmp_path, start_row=1, steps=5, harder=3.0, agreement=False)
    assert set(served) == {0.4}
    assert c.state() is None  # no move written


def test_shadow_samples_of_every_stage_are_tallied_per_stage_and_the_students_by_stratum():
    from cascade_server.gateway.window import Summary, Window

    config = ControllerConfig()
    window = Window(config, strata=4)
    window.reset("v1", stages=3)
    window.counting = True
    margins = np.array([0.1, 0.9, 0.2, 0.3])
    agrees = np.array([True, False, False, True])
    window.shadowed(margins, agrees, np.array([0, 0, 1, 1]))
    window.shadowed(margins[:1], agrees[:1], np.array([5]))  # another version's stages
    mine = window.roll()
    assert mine.shadowed.tolist() == [1, 0, 0, 1]  # the student's two, by their strata
    assert mine.disagreed.tolist() == [0, 0, 0, 1]
    assert mine.stage_shadowed.tolist() == [2, 2, 0]
    assert mine.stage_disagreed.tolist() == [1, 1, 0]
    back = Summary.from_bytes(mine.to_bytes(), config.relative_accuracy, 4)
    assert back.stage_disagreed.tolist() == [1, 1, 0]
    window.clear_stages()  # a row moved: the tiers' tallies are the old row's
    after = window.roll()
    assert after.stage_shadowed.size == 0 and after.shadowed.tolist() == [1, 0, 0, 1]


def test_the_evidence_horizon_keeps_shadow_tallies_beyond_the_window():
    from cascade_server.gateway.window import Summary, Window

    config = ControllerConfig(window_items=100, buckets=2, evidence_items=1000)
    window = Window(config, strata=2)
    window.reset("v1")
    window.stratified = True
    for step in range(20):  # 50 items a roll: a bucket per roll, 1,000 items in all
        margins = np.full(50, 0.75)
        window.routed(margins, 0)
        window.answered(margins, 0)
        window.shadowed(margins[:10], np.arange(10) >= 1)  # 1 of 10 disagrees
        summary = window.roll(now=float(step))
    assert summary.items == 100  # the window: the last two buckets
    assert summary.shadowed.tolist() == [0, 20]
    assert summary.evidence is not None
    assert summary.evidence.shadowed.tolist() == [0, 200]  # the horizon: all twenty
    assert summary.evidence.disagreed.tolist() == [0, 20]
    assert summary.evidence.answered.tolist() == [0, 1000]
    back = Summary.from_bytes(summary.to_bytes(), config.relative_accuracy, 2)
    merged = Summary.empty(config.relative_accuracy, 2)
    merged.merge(back)
    merged.merge(back)  # two workers
    assert merged.evidence is not None and merged.evidence.shadowed.tolist() == [0, 400]
    window.stratified = False  # shadows off: only the window is kept
    assert window.roll(now=20.0).evidence is None


def test_a_window_counted_on_another_row_gives_no_per_stage_counts(tmp_path):
    """Around a move, a worker that has not seen it yet still publishes the old row's counts:
    the merge keeps its window but not its per-stage counts and tallies."""
    from cascade_server.gateway.window import Summary

    frontier, pol = _frontier_and_budget_policy(budget=0.35, start_row=0)
    c = controller(tmp_path, min_items=100)
    c.reset("v1", stages=3)
    other = Summary.empty(c.config.relative_accuracy, 10)
    other.items, other.version, other.row = 500.0, "v1", "an older row"
    other.stages = np.array([400.0, 50.0, 50.0])
    other.stage_shadowed = np.array([80.0, 10.0, 10.0])
    c.store.backend.publish(c.live_group, "worker-behind", other.to_bytes(), 60.0)

    async def main():
        c.threshold_for(pol)
        c.window.answered_by(np.array([100, 0, 0]))
        await c.step(pol, CAL, frontier=frontier, costs=COSTS)

    asyncio.run(main())
    assert c.merged.workers == 2 and c.merged.items == 500.0  # its window is merged ...
    assert c.merged.stages.tolist() == [100, 0, 0]  # ... not its per-stage counts
    assert c.merged.stage_shadowed.size == 0


def _teacher_only_hold(tmp_path, steps, stratified):
    from cascade_server.bundle import Frontier, FrontierRow

    rows = (
        FrontierRow(
            thresholds=(0.5,),
            answered=(0.5, 0.5),
            cascade_accuracy=0.9,
            expected_cost=0.55,
            teacher_agreement=0.97,
        ),
        FrontierRow(
            thresholds=(1.0,),
            answered=(0.0, 1.0),
            cascade_accuracy=0.95,
            expected_cost=1.05,
            teacher_agreement=1.0,
        ),
    )
    frontier = Frontier(split="val", n=1000, rows=rows)
    pol = policy(mode="target_accuracy", threshold=1.0, target_delegation_rate=None)
    pol = pol.model_copy(update={"target_accuracy": 0.95})
    c = controller(tmp_path, min_items=100)
    c.reset("v1", stages=2)
    c.window.stratified = stratified
    served = []

    async def main():
        for _ in range(steps):
            c.threshold_for(pol)
            c.window.answered_by(np.array([0, 300]))  # the teacher answers everything
            await asyncio.sleep(0.01)
            await c.step(pol, CAL, frontier=frontier, costs=(0.05, 1.0))
            served.append(c.threshold_for(pol))

    asyncio.run(main())
    return served


def test_a_row_the_teacher_answers_alone_is_probed_one_row_cheaper_now_and_then(tmp_path):
    """No stage but the teacher answers there, so no sample says how live traffic compares
    with the calibration: after sixty steps the controller tries one row cheaper (where the
    window will show it at once if it does not hold) instead of staying forever."""
    served = _teacher_only_hold(tmp_path, 70, stratified=True)
    assert served[:59] == [1.0] * 59
    assert served[-1] == 0.5


def test_without_shadow_samples_a_target_accuracy_is_never_probed(tmp_path):
    assert set(_teacher_only_hold(tmp_path, 70, stratified=False)) == {1.0}
