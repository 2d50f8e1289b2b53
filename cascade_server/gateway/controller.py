"""The delegation controller: holds an online policy (control.py) on live traffic.

Every `interval_s`, each worker rolls its window (window.py), publishes it through the control
store under a key of its own that expires (`worker_ttl_s`), and reads the controller's shared
state. When the state is due (older than an interval) the worker merges every live window (all
workers, all replicas) and moves the threshold:

- `target_delegation_rate`: to the margin quantile that delegates the target share of the
  window, by at most `max_step`, held within a deadband (hysteresis), within the policy's
  bounds. Items delegated whatever the threshold (by class, non-finite logits) count first:
  with a share c of them, the threshold aims at `P(margin < t) = (target - c) / (1 - c)` over
  the rest;
- `cost_budget`: along the frontier (every stage's threshold at once, bundle.py): the live cost
  per item (the items each stage answered, each paying every stage up to it) against the
  frontier row in force gives how much dearer live traffic is than the calibration split.
  Over the budget, the most accurate row whose calibrated cost, so scaled, fits is taken at
  once; under it, one row dearer at a time, after ten steps in a row that say it fits;
- `target_accuracy`: along the frontier too, on the cascade's live agreement with the teacher
  (shadow samples of every stage's answers, the teacher's own agreeing by definition) held at
  the agreement the calibration split shows at the target accuracy (interpolated between the
  frontier's rows: the target in the teacher's terms). The live disagreement against the
  calibrated one of the row in force gives how much harder live traffic is: when it is a
  quarter over the target's with 95% confidence, the cheapest dearer row whose calibrated
  disagreement, so scaled, fits is taken at once; one row cheaper after ten steps in a row in
  which that row fits on the evidence horizon's 95% bound (from a row the teacher answers
  alone, which gives nothing to scale by, a probe after sixty steps);
- `max_student_error`: up, when the live estimate of the student's error on what it answers
  alone (shadow samples, teacher as reference, held at the calibration's own disagreement at
  the start threshold) is above the target with 90% confidence: to the lowest margin stratum
  whose estimate fits, by at most `max_step`; back down towards the calibrated start, half a
  step at a time, each after ten steps in a row within the target with 95% confidence; held
  in between.

Every worker merges the windows each interval (its estimates and metrics stay fresh); the move
itself is a compare-and-set on the state's step counter, without an audit entry (operators'
changes are audited; the controller's moves are metrics): of the workers that find it due, the
first write wins and the others, which read the same step, make none. Every worker serves the
shared threshold. A move is logged at most once per interval. Windows of another student
version (a worker not flipped yet, around a rollout) are left out of the merge.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import time
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel

from ..bundle import Calibration, Frontier, FrontierRow
from ..config.delegation import ControllerConfig
from .control import ON_FRONTIER, PolicyState
from .estimates import UNKNOWN, Estimate, agreement, error_above, stages_agreement
from .metrics import Metrics
from .stores import ControlStore
from .window import Evidence, Summary, Window

log = logging.getLogger(__name__)
_MIN_SAMPLES = 30  # shadow samples before the error mode, or a target accuracy, moves dearer
# A row that leaves the sampled stages nothing (the teacher answers it all) says nothing of
# how live traffic compares with the calibration: one row cheaper is probed after this many
# steps, and the window says at once if it does not hold.
_PROBE_AFTER = 60
_TOLERANCE = 0.25  # a target accuracy moves dearer on a disagreement over its target by this
_PLAIN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # a version usable as it is in a key (file name)
_LOWER_AFTER = 10  # steps in a row within the bound before it comes down (a probe)


class ControllerState(BaseModel):
    threshold: float
    policy: str  # PolicyState.stamp() of the policy it holds
    at: float  # time.time() of the last step that moved or confirmed it
    observed_rate: float | None = None
    items: float = 0.0
    reason: str = ""
    step: int = 0  # steps taken for this policy: a write succeeds only on the step it read
    # Error mode: steps in a row with the live error within its target; cost_budget: steps in
    # a row a dearer row would fit; target_accuracy: a cheaper one.
    within: int = 0
    tiers: tuple[float, ...] | None = None  # frontier modes: the tiers' thresholds of its row
    live_cost: float | None = None  # cost_budget: per item, over the window
    # target_accuracy: the cascade's live agreement with the teacher, and the agreement it is
    # held at (the calibration's at the target accuracy, between the frontier's rows).
    live_agreement: float | None = None
    target_agreement: float | None = None


def worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Controller:
    def __init__(
        self,
        cascade: str,
        config: ControllerConfig,
        store: ControlStore,
        metrics: Metrics,
        strata: int,
    ) -> None:
        self.cascade = cascade
        self.config = config
        self.store = store
        self.metrics = metrics
        self.strata = strata
        self.window = Window(config, strata)
        self.live_group = f"{cascade}.window"
        self.me = worker_id()
        self.merged: Summary = Summary.empty(config.relative_accuracy, strata)
        self.student_estimate: Estimate = UNKNOWN
        self.cascade_estimate: Estimate = UNKNOWN
        self._stamp: object = None
        self._state: ControllerState | None = None
        self._row_seen: object = None  # cost_budget: the row whose traffic the window counts
        self.key = self._key_of("")

    def _key_of(self, version: str) -> str:
        """The shared state's key, one per student version: around a rollout, replicas still on
        the old version hold their own threshold instead of overwriting the new version's
        state every interval (each would restart the other from its start). Set once per
        version (here and in `reset`), not per batch."""
        if not version:
            return f"{self.cascade}.controller"
        if not _PLAIN.match(version):
            version = hashlib.sha256(version.encode()).hexdigest()[:16]
        return f"{self.cascade}.controller.{version}"

    def reset(self, version: str, stages: int = 2) -> None:
        """A new student version: its window starts empty (and the policy's stamp, which names
        the version, leaves the old version's moves behind). `stages`: how many answer."""
        self.window.reset(version, stages)
        self._row_seen = None
        self.key = self._key_of(version)
        self._stamp, self._state = None, None  # the new version's key: read afresh
        self.merged = Summary.empty(self.config.relative_accuracy, self.strata)
        self.student_estimate = self.cascade_estimate = UNKNOWN

    # The request path.
    def state(self) -> ControllerState | None:
        """The shared state (the store's in-process view: no I/O)."""
        stamp, raw = self.store.read(self.key)
        if stamp != self._stamp:
            self._stamp = stamp
            self._state = _parse(raw)
            if raw and self._state is None:
                log.error("ignoring unreadable controller state %s", self.key)
        return self._state

    def threshold_for(self, policy: PolicyState) -> float:
        """The threshold in force for `policy`: the controller's while it holds this policy,
        else the policy's own start."""
        # Margins are sketched from the first batch an online target is served (not the first
        # step after it): the window fills sooner.
        self.window.sketching = self.config.enabled and policy.mode == "target_delegation_rate"
        # Answers per stage: for the frontier modes, and for the live agreement of a cascade
        # with tiers while shadow samples are taken (the tiers' shares of the answers).
        w = self.window
        counting = (self.config.enabled and policy.mode in ON_FRONTIER) or (
            w.stratified and w.stage_count > 2
        )
        if counting and not w.counting:
            w.clear_stages()  # counting starts: nothing from before it
        w.counting = counting
        if not policy.online or not self.config.enabled:
            return policy.threshold
        state = self.state()
        if state is None or state.policy != policy.stamp():
            return policy.threshold
        return policy.clamp(state.threshold)

    def tiers_for(self, policy: PolicyState) -> tuple[float, ...] | None:
        """The tiers' thresholds in force for `policy` (None: the policy's own)."""
        if policy.mode not in ON_FRONTIER or not self.config.enabled:
            return None
        state = self.state()
        if state is None or state.policy != policy.stamp():
            return None
        return state.tiers

    # Once per interval.
    async def step(
        self,
        policy: PolicyState,
        calibration: Calibration,
        frontier: Frontier | None = None,
        costs: tuple[float, ...] = (),
    ) -> None:
        """`frontier`, `costs` (per stage, the teacher last): the version's, for the frontier
        modes."""
        self.window.sketching = self.config.enabled and policy.mode == "target_delegation_rate"
        if policy.mode in ON_FRONTIER:
            # A new target, or a row moved (by any worker): its traffic starts a new count,
            # here and (as each notices within an interval) on every worker; the move after
            # waits for min_items. Keyed on what this policy serves, not on the state stored
            # (which may still be an earlier policy's).
            tiers_now = self.tiers_for(policy) or policy.tier_thresholds
            serving = (policy.stamp(), self.threshold_for(policy), tiers_now)
            if self._row_seen is not None and serving != self._row_seen:
                self.window.clear_stages()
            self._row_seen = serving
            self.window.row = repr(serving)
        else:
            self.window.row = ""
        if policy.mode != "cost_budget":
            self.metrics.live_cost(self.cascade, None)
        local = self.window.roll()
        version = self.window.version
        merged = Summary.empty(self.config.relative_accuracy, self.strata)
        collected = await self.store.call(self._exchange, local.to_bytes())
        if self.window.version != version:
            return  # a flip while the windows were exchanged: this step was the old version's
        for raw in collected:
            try:
                other = Summary.from_bytes(raw, self.config.relative_accuracy, self.strata)
            except (ValueError, KeyError, TypeError):
                log.warning("cascade %s: skipping an unreadable live window", self.cascade)
                continue
            # Around a rollout, a worker still on the other version: its traffic says nothing
            # of the student this one serves.
            if not other.version or other.version == self.window.version:
                if other.row != self.window.row:
                    # Around a move, a worker that has not seen it yet: its per-stage counts
                    # are the old row's (its margins and the student's strata still count).
                    other.drop_stages()
                merged.merge(other)
        self.merged = merged
        threshold = self.threshold_for(policy)
        self._estimate(merged, threshold)
        self.metrics.live(
            self.cascade,
            merged,
            threshold,
            self.student_estimate,
            self.cascade_estimate,
            calibration,
        )
        if not (policy.online and self.config.enabled):
            return
        state = self.state()
        held = state if state is not None and state.policy == policy.stamp() else None
        if held is not None and time.time() - held.at < self.config.interval_s * 0.8:
            return  # another worker stepped this interval
        within = held.within if held is not None else 0
        tiers, live_cost, live_agreement, target_agreement = None, None, None, None
        if policy.mode in ON_FRONTIER:
            if frontier is None or not costs:
                return
            tiers = held.tiers if held is not None else policy.tier_thresholds
            if policy.mode == "cost_budget":
                row, reason, live_cost, within = self._on_frontier(
                    policy, threshold, tiers, merged, frontier, costs, within
                )
                if live_cost is not None:
                    self.metrics.live_cost(self.cascade, live_cost)
            else:
                row, reason, live_agreement, target_agreement, within = self._for_accuracy(
                    policy, threshold, tiers, merged, frontier, within
                )
            if row is None:
                return
            new, tiers = row.thresholds[0], (row.thresholds[1:] or None)
            before = (held.threshold, held.tiers) if held else (threshold, policy.tier_thresholds)
            moved = (new, tiers) != before
        else:
            desired, reason, within = self._desired(policy, threshold, merged, calibration, within)
            if desired is None:
                return
            new = policy.clamp(
                threshold
                + float(np.clip(desired - threshold, -self.config.max_step, self.config.max_step))
            )
            if abs(new - threshold) < self.config.min_change:
                new = threshold  # within the hysteresis band: confirm, do not move
            moved = new != threshold
        step = held.step if held is not None else 0
        record = ControllerState(
            threshold=new,
            policy=policy.stamp(),
            at=time.time(),
            observed_rate=merged.delegation_rate,
            items=merged.items,
            reason=reason,
            step=step + 1,
            within=within,
            tiers=tiers,
            live_cost=live_cost,
            live_agreement=live_agreement,
            target_agreement=target_agreement,
        )
        value = record.model_dump_json().encode()

        def change(raw: bytes | None) -> tuple[bytes | None, None]:
            # Compare-and-set on the step this worker read: a worker that stepped meanwhile
            # (its write not seen here yet) keeps its move, and this one makes none.
            current = _parse(raw)
            seen = current.step if current is not None and current.policy == record.policy else 0
            return (value if seen == step else raw), None

        if await self.store.update(self.key, change) != value:
            return
        if moved:
            self.metrics.controller_moved(self.cascade)
            log.info(
                "cascade %s: controller threshold %.4f -> %.4f (%s; window %d items from %d "
                "workers, delegation %.3f)",
                self.cascade,
                threshold,
                new,
                reason,
                merged.items,
                merged.workers,
                merged.delegation_rate or 0.0,
            )

    def _on_frontier(
        self,
        policy: PolicyState,
        threshold: float,
        tiers: tuple[float, ...] | None,
        merged: Summary,
        frontier: Frontier,
        costs: tuple[float, ...],
        within: int,
    ) -> tuple[FrontierRow | None, str, float | None, int]:
        """(the frontier row to serve or None to wait, why, the live cost per item, the steps
        in a row a dearer row fitted)."""
        assert policy.cost_budget is not None
        budget = policy.cost_budget
        answered = merged.stages
        if answered.shape != (len(costs),) or answered.sum() < self.config.min_items:
            return None, "filling the window", None, within
        # An item answered by stage k paid for stages 0..k.
        live = float(np.dot(answered, np.cumsum(costs)) / answered.sum())
        rows = frontier.rows
        here = _nearest(frontier, (threshold, *(tiers or ())))
        calibrated = rows[here].expected_cost
        scale = live / calibrated if calibrated > 0 else 1.0
        fits = [i for i, r in enumerate(rows) if r.expected_cost * scale <= budget]
        # The rows are by cost, each more accurate than the cheaper ones (Pareto).
        want = fits[-1] if fits else 0
        why = f"live cost {live:.4f} ({scale:.2f}x the calibration's) against {budget:.4f}"
        if live > budget * (1 + self.config.deadband) and want < here:
            return rows[want], why, live, 0  # over the budget: cheaper at once
        # Under it: one row dearer at a time, after LOWER_AFTER steps in a row that say it
        # fits (the scale is measured on the row in force; on a dearer row it may not hold).
        within = within + 1 if want > here else 0
        if within >= _LOWER_AFTER:
            return rows[here + 1], why, live, 0
        return rows[here], f"live cost {live:.4f} within the budget {budget:.4f}", live, within

    def _for_accuracy(
        self,
        policy: PolicyState,
        threshold: float,
        tiers: tuple[float, ...] | None,
        merged: Summary,
        frontier: Frontier,
        within: int,
    ) -> tuple[FrontierRow | None, str, float | None, float | None, int]:
        """(the frontier row to serve or None to wait, why, the live agreement, the target
        agreement, the steps in a row a cheaper row fitted)."""
        assert policy.target_accuracy is not None
        rows = frontier.rows
        here = _nearest(frontier, (threshold, *(tiers or ())))
        if any(r.teacher_agreement is None for r in rows):
            why = "the frontier has no teacher agreement (calibrated before it): not held"
            return None, why, None, None, within
        agreements = [float(r.teacher_agreement or 0.0) for r in rows]
        # The target in the terms seen live: the agreement with the teacher the calibration
        # shows at the target accuracy, between the rows around it (accuracy rises strictly
        # along the frontier; agreement mostly does, not always, so the row the target
        # resolved to usually, not always, reaches it).
        target = float(
            np.interp(policy.target_accuracy, [r.cascade_accuracy for r in rows], agreements)
        )
        calibrated = agreements[here]
        answered = merged.stages
        if answered.size < 2 or answered.sum() < self.config.min_items:
            return None, "filling the window", None, target, within
        start = _stratum(threshold, self.strata)
        # The window's estimate, as `_estimate` made it this step (on these per-stage counts,
        # from the same threshold).
        live = self.cascade_estimate
        # A row that disagreed on none of the calibration split's n items: under 1/n.
        d_here, d_target = max(1.0 - calibrated, 1.0 / frontier.n), 1.0 - target
        if rows[here].teacher_rate > 0.999:
            if not self.window.stratified:
                return None, "no shadow samples (CASCADE_SHADOW__FRACTION)", None, target, within
            # Nothing here to measure live traffic against the calibration by.
            why = "the row in force leaves nothing to compare: the teacher answers it all"
            within += 1
            if here > 0 and within >= _PROBE_AFTER:
                return rows[here - 1], why + "; one row cheaper, a probe", None, target, 0
            return rows[here], why, None, target, within
        if not live.known:
            return None, "no shadow samples yet", None, target, within

        # Disagreement, live against calibrated on the row in force: how much harder the live
        # traffic is.
        def scale(agree: float) -> float:
            return (1.0 - agree) / d_here

        def disagreement(i: int) -> float:
            return 1.0 - agreements[i]

        # Quick in the safe direction, as the error mode: a one-sided bound says the live
        # agreement is under the target; the cheapest dearer row that the scale says fits.
        # Hysteresis: the row a target resolves to is the cheapest reaching it, often just
        # at it, and a window holds a few hundred samples (a disagreement of 2% is known to
        # +-1% there): a test repeated every interval on traffic at the target would sooner
        # or later fire. Dearer only when the live disagreement is, with 95% confidence, a
        # quarter over the target's (a shift to Fashion-MNIST's hard classes doubles it).
        quick = self._stages_estimate(merged, start, 0.9)
        over = 1.0 - (1.0 - quick.upper) / (1.0 + _TOLERANCE)
        if live.samples >= _MIN_SAMPLES and over < target:
            s = scale(live.value)
            dearer = [i for i in range(here + 1, len(rows)) if disagreement(i) * s <= d_target]
            want = dearer[0] if dearer else len(rows) - 1
            why = (
                f"live agreement {live.value:.4f} (95% upper bound {quick.upper:.4f}) "
                f"< {target:.4f}"
            )
            if want > here:
                return rows[want], why, live.value, target, 0
            return rows[here], why + ": the most accurate row already", live.value, target, 0
        # One row cheaper after LOWER_AFTER steps in a row in which it fits on the 95% bound
        # of the evidence horizon (the tallies of many windows, weighed by the window's
        # shares), and on the window's own estimate (the evidence may predate a shift). The
        # scale is measured on the row in force: a probe, as the cost mode's climb.
        slow = self._stages_estimate(merged, start, self.config.confidence, evidence=True)
        fits = (
            here > 0
            and slow.known
            and disagreement(here - 1) * scale(slow.lower) <= d_target
            and disagreement(here - 1) * scale(live.value) <= d_target
        )
        within = within + 1 if fits else 0
        why = f"live agreement {live.value:.4f} in [{live.lower:.4f}, {live.upper:.4f}]"
        if within >= _LOWER_AFTER:
            return rows[here - 1], why + f" >= {target:.4f}", live.value, target, 0
        return rows[here], why, live.value, target, within

    def _stages_estimate(
        self,
        merged: Summary,
        start: int,
        confidence: float,
        evidence: bool = False,
        stages: np.ndarray | None = None,
    ) -> Estimate:
        """The cascade's live agreement: on the window's tallies, or (`evidence`) on the
        evidence horizon's, weighed by the window's shares of the answers (or `stages`)."""
        tallies: Summary | Evidence = merged
        if evidence:
            if merged.evidence is None:
                return UNKNOWN
            tallies = merged.evidence
        return stages_agreement(
            tallies.answered,
            tallies.shadowed,
            tallies.disagreed,
            start,
            merged.stages if stages is None else stages,
            tallies.stage_shadowed,
            tallies.stage_disagreed,
            confidence,
            finite=not evidence,
        )

    def _exchange(self, local: bytes) -> list[bytes]:
        """On a thread (one hop for both): this worker's window out, every live one in."""
        backend, ttl = self.store.backend, self.config.worker_ttl_s
        backend.publish(self.live_group, self.me, local, ttl)
        return backend.collect(self.live_group, ttl)

    def _estimate(self, merged: Summary, threshold: float) -> None:
        self.student_estimate = agreement(
            merged.answered, merged.shadowed, merged.disagreed, self.config.confidence
        )
        stages, start = merged.stages, _stratum(threshold, self.strata)
        if stages.size < 2 or stages.sum() <= 0:
            # Not counted per stage (a two-stage cascade outside the frontier modes): the
            # student's and the teacher's answers, over every stratum.
            stages, start = np.array([merged.student_answered, merged.teacher_answered]), 0
        self.cascade_estimate = self._stages_estimate(
            merged, start, self.config.confidence, stages=stages
        )

    def _desired(
        self,
        policy: PolicyState,
        threshold: float,
        merged: Summary,
        calibration: Calibration,
        within: int,
    ) -> tuple[float | None, str, int]:
        """(the threshold wanted or None to wait, why, the error mode's steps within)."""
        if policy.mode == "target_delegation_rate":
            assert policy.target_delegation_rate is not None
            if merged.sketch.count < self.config.min_items:  # sketching has just begun
                return None, "filling the window", 0
            # Items delegated whatever the threshold (by class, non-finite) take their share
            # first; the threshold moves the rest, whose margins the sketch holds.
            forced = merged.forced_rate
            if forced >= policy.target_delegation_rate:
                return 0.0, f"{forced:.3f} delegated by class alone, above the target", 0
            target = (policy.target_delegation_rate - forced) / (1.0 - forced)
            # Hysteresis, on the window's own margins (so no lag behind the moves): hold while
            # the threshold in force delegates within the deadband of the target here, or within
            # two standard errors (a window of n items cannot tell a rate closer than that).
            n = merged.sketch.count
            band = max(self.config.deadband, 2 * (target * (1 - target) / n) ** 0.5)
            low = merged.quantile(max(target - band, 0.0))
            high = merged.quantile(min(target + band, 1.0))
            if low is not None and high is not None and low <= threshold <= high:
                return threshold, f"delegation within {band:.3f} of the target", 0
            q = merged.quantile(target)
            return q, f"margin quantile {target:.3f}", 0
        assert policy.max_student_error is not None
        target = live_target(policy, calibration)
        start = _stratum(threshold, self.strata)
        confidence = self.config.confidence
        live = error_above(merged.answered, merged.shadowed, merged.disagreed, start, confidence)
        if not live.known:
            return None, "no shadow samples yet", within
        # Asymmetric, as the promise is: raise on a one-sided 90% bound (the live error is
        # above the target with 90% confidence: quick, and the safe direction), come back only
        # after LOWER_AFTER steps in a row with the 95% upper bound below the target, a half
        # step at a time (the strata below the threshold have no student answers to check, so
        # coming down is a probe); hold in between. Waiting for the 95% bound before raising
        # would leave a shift's errors unanswered for thousands of requests.
        quick = error_above(merged.answered, merged.shadowed, merged.disagreed, start, 0.8)
        if live.samples >= _MIN_SAMPLES and quick.lower > target:
            reason = (
                f"live error {live.value:.4f} (90% lower bound {quick.lower:.4f}) > {target:.4f}"
            )
            for edge in range(start + 1, self.strata):
                above = error_above(
                    merged.answered, merged.shadowed, merged.disagreed, edge, confidence
                )
                if above.known and above.value <= target:
                    return edge / self.strata, reason, 0
            return threshold + self.config.max_step, reason, 0
        # Down on the evidence horizon's bound (the window's ~hundreds of samples cannot put
        # a 95% bound under a target of a few percent), and the window's own estimate within.
        ev = merged.evidence
        slow = (
            live
            if ev is None
            else error_above(ev.answered, ev.shadowed, ev.disagreed, start, confidence, False)
        )
        within = within + 1 if slow.known and slow.upper < target and live.value <= target else 0
        if within >= _LOWER_AFTER and threshold > policy.threshold:
            # The count starts again: the strata just opened to the student have few samples
            # in the window yet, and the next move waits for ten steps of evidence on them.
            down = max(policy.threshold, threshold - self.config.max_step / 2)
            return (
                down,
                f"live error {live.value:.4f} (upper bound {slow.upper:.4f}) < {target:.4f}",
                0,
            )
        reason = f"live error {live.value:.4f} in [{live.lower:.4f}, {live.upper:.4f}]"
        return threshold, reason, within

    def describe(self, calibration: Calibration | None = None) -> dict[str, Any]:
        """What GET /admin/threshold and /cascades show of the live state (the merged window
        of every worker and replica, as of the last step)."""
        state = self.state()
        m = self.merged
        out: dict[str, Any] = {
            "controller": None if state is None else orjson.loads(state.model_dump_json()),
            "window": {
                "items": m.items,
                "workers": m.workers,
                "delegation_rate": m.delegation_rate,
            },
            "live_student_agreement": _estimate_dict(self.student_estimate),
            "live_cascade_agreement": _estimate_dict(self.cascade_estimate),
        }
        answers = m.student_answered + m.teacher_answered
        if calibration is not None and answers:
            share = m.teacher_answered / answers
            cost = calibration.cost_student + share * calibration.cost_teacher
            out["savings"] = {
                # Against teacher-only serving, over the window, in the calibration's costs.
                "teacher_calls_avoided": 1.0 - share,
                "compute_saved": 1.0 - cost / calibration.cost_teacher,
            }
        return out


def live_target(policy: PolicyState, calibration: Calibration) -> float:
    """The operator's bound is on the student's error against the labels; live, only its
    disagreement with the teacher is seen. The live target is the disagreement the calibration
    split shows at the threshold the bound resolved to (the bound in the teacher's terms): a
    mix the student does worse on raises it there, whatever the teacher's own errors. Without
    those counts, the bound itself."""
    assert policy.max_student_error is not None
    row = calibration.accepted_at(policy.threshold)
    if row is None or not row.accepted or row.accepted_disagreements is None:
        return policy.max_student_error
    return row.accepted_disagreements / row.accepted


def _nearest(frontier: Frontier, thresholds: tuple[float, ...]) -> int:
    """The frontier row closest to `thresholds` (every stage's, the student first): the row
    served now, or a policy's own."""
    rows = frontier.rows

    def distance(i: int) -> float:
        return max(abs(a - b) for a, b in zip(rows[i].thresholds, thresholds, strict=False))

    return min(range(len(rows)), key=distance)


def _stratum(threshold: float, strata: int) -> int:
    """The margin stratum a threshold falls in: the student answers it and those above."""
    return int(min(threshold, 0.999999) * strata)


def _parse(raw: bytes | None) -> ControllerState | None:
    if not raw:
        return None
    try:
        return ControllerState.model_validate_json(raw)
    except ValueError:
        return None


def _estimate_dict(e: Estimate) -> dict[str, float | int] | None:
    if not e.known:
        return None
    return {"value": e.value, "lower": e.lower, "upper": e.upper, "samples": e.samples}
