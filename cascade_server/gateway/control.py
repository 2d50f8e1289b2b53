"""The delegation policy of a cascade, set by an operator and shared by every worker and replica.

Three modes, each audited when set (who, when, old -> new):
- `threshold`: a fixed threshold (the bundle's calibrated default is one);
- `target_delegation_rate`: a share of traffic for the teacher. It starts at the threshold the
  calibration table gives for it and is then held online by the controller (controller.py),
  within `min_threshold`..`max_threshold`;
- `max_student_error`: the risk accepted on what the student answers alone. It starts at the
  lowest threshold whose upper confidence bound of the student's error on the calibration split
  is within it, by fixed-sequence testing (bundle.py; refused, naming the best, when none is),
  and the controller raises it when the live estimate (shadow samples) says the error is
  higher;
- `target_accuracy` / `cost_budget`: every stage's threshold from the calibrated frontier
  (bundle.py), the cheapest row reaching the accuracy or the most accurate within the budget,
  then held along the frontier by the controller (the accuracy on the cascade's live agreement
  with the teacher, from shadow samples; the budget on the live cost per item).

The state lives in the control store (stores.py); every use reads the store's in-process view,
so a change made through any worker applies to the next batch on every worker and survives a
restart. The controller's moves are not here: they are its own state, and metrics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from ..bundle import Calibration, Frontier
from ..errors import InvalidInput
from .stores import ControlStore, now

log = logging.getLogger(__name__)
Mode = Literal[
    "threshold", "target_delegation_rate", "max_student_error", "target_accuracy", "cost_budget"
]
# Held live by the delegation controller (controller.py); a cost budget walks the frontier.
ONLINE: tuple[Mode, ...] = (
    "target_delegation_rate",
    "max_student_error",
    "target_accuracy",
    "cost_budget",
)
# Every stage's threshold from the calibrated frontier (bundle.py), resolved per version.
ON_FRONTIER: tuple[Mode, ...] = ("target_accuracy", "cost_budget")
# The modes that move the student's threshold alone, within min/max_threshold (a cost budget
# serves whole frontier rows: a clamped row would be no row).
BOUNDED: tuple[Mode, ...] = ("target_delegation_rate", "max_student_error")


class PolicyState(BaseModel):
    mode: Mode = "threshold"
    # The threshold in force before the controller moves it: the fixed one, or what the
    # calibration gives for the target (resolved for the student version loaded).
    threshold: float = Field(ge=0.0, le=1.0)
    target_delegation_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    max_student_error: float | None = Field(default=None, ge=0.0, le=1.0)
    target_accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    cost_budget: float | None = Field(default=None, ge=0.0)
    # The tiers' thresholds chosen with the student's (N-stage cascades, frontier modes);
    # None: the bundle's.
    tier_thresholds: tuple[float, ...] | None = None
    # Bounds on the controller's moves (and on the resolved start).
    min_threshold: float = Field(default=0.0, ge=0.0, le=1.0)
    max_threshold: float = Field(default=1.0, ge=0.0, le=1.0)
    # bundle: the student's calibrated default; admin: set at runtime.
    source: Literal["bundle", "admin"]
    student_version: str
    updated_at: str | None = None
    updated_by: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _older_records(cls, data: Any) -> Any:
        """Records written before modes existed: a target rate, or a threshold."""
        if isinstance(data, dict) and "mode" not in data:
            data = {**data}
            data["mode"] = (
                "target_delegation_rate"
                if data.get("target_delegation_rate") is not None
                else "threshold"
            )
        return data

    @property
    def online(self) -> bool:
        return self.mode in ONLINE

    @property
    def resolved(self) -> bool:
        """Its thresholds are resolved through each version's calibration."""
        return self.mode in ONLINE or self.mode in ON_FRONTIER

    @property
    def target(self) -> float | None:
        value: float | None = None if self.mode == "threshold" else getattr(self, self.mode)
        return value

    def stamp(self) -> str:
        """Identifies this policy: the controller's moves are for one policy only."""
        return f"{self.mode}:{self.target}:{self.updated_at}:{self.student_version}"

    def clamp(self, value: float) -> float:
        """Within the bounds, in the modes that have them (BOUNDED)."""
        if self.mode not in BOUNDED:
            return value
        return min(max(value, self.min_threshold), self.max_threshold)


@dataclass(frozen=True)
class Resolved:
    mode: Mode
    threshold: float  # the student's (the controller's start in the online modes)
    tiers: tuple[float, ...] | None = None  # every tier's, in the frontier modes


def resolve(
    calibration: Calibration,
    *,
    threshold: float | None = None,
    target_delegation_rate: float | None = None,
    max_student_error: float | None = None,
    target_accuracy: float | None = None,
    cost_budget: float | None = None,
    frontier: Frontier | None = None,
    confidence: float = 0.95,
    tiers: int = 0,
) -> Resolved:
    """The mode asked for and its thresholds on this calibration (and frontier: a two-stage
    bundle's is its calibration table's)."""
    asked = {
        "threshold": threshold,
        "target_delegation_rate": target_delegation_rate,
        "max_student_error": max_student_error,
        "target_accuracy": target_accuracy,
        "cost_budget": cost_budget,
    }
    given = [k for k, v in asked.items() if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(asked)}")
    if threshold is not None:
        return Resolved("threshold", threshold)
    if target_delegation_rate is not None:
        return Resolved(
            "target_delegation_rate", calibration.threshold_for_rate(target_delegation_rate)
        )
    try:
        if max_student_error is not None:
            return Resolved(
                "max_student_error",
                calibration.threshold_for_student_error(max_student_error, confidence),
            )
        if tiers and frontier is None:
            # The two-stage table knows nothing of the tiers: its rows would be wrong here.
            raise ValueError(
                "this N-stage bundle has no frontier (calibrate it with `cascade-train "
                "compose`): give a threshold or a delegation target"
            )
        on = frontier or calibration.frontier()
        if target_accuracy is not None:
            row = on.for_accuracy(target_accuracy)
        else:
            assert cost_budget is not None
            row = on.for_cost(cost_budget)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    mode: Mode = "target_accuracy" if target_accuracy is not None else "cost_budget"
    return Resolved(mode, row.thresholds[0], row.thresholds[1:] if frontier else None)


class ThresholdStore:
    """The delegation policy of one cascade for one student version: the bundle's calibrated
    default, or what an admin set, resolved through this version's calibration."""

    def __init__(
        self,
        store: ControlStore,
        cascade: str,
        *,
        default_threshold: float,
        calibration: Calibration,
        student_version: str,
        frontier: Frontier | None = None,
        confidence: float = 0.95,
        tiers: int = 0,
    ) -> None:
        self.store = store
        self.tiers = tiers
        self.cascade = cascade
        self.key = f"{cascade}.threshold"
        self.calibration = calibration
        self.frontier = frontier
        self.student_version = student_version
        self.confidence = confidence
        self._default = PolicyState(
            threshold=default_threshold, source="bundle", student_version=student_version
        )
        self._state = self._default
        self._stamp: object = None
        self.current()

    def current(self) -> PolicyState:
        stamp, raw = self.store.read(self.key)
        if raw is None:
            self._stamp, self._state = None, self._default
        elif stamp != self._stamp:
            self._state = self._load(raw)
            self._stamp = stamp
        return self._state

    def _load(self, raw: bytes) -> PolicyState:
        try:
            state = PolicyState.model_validate_json(raw)
        except ValueError as exc:
            log.error("ignoring unreadable threshold state %s: %s", self.key, exc)
            return self._default
        if state.resolved:
            try:
                got = resolve(
                    self.calibration,
                    **{state.mode: state.target},
                    frontier=self.frontier,
                    confidence=self.confidence,
                    tiers=self.tiers,
                )
            except (ValueError, InvalidInput) as exc:
                # This version cannot meet a target set for another: its calibrated default.
                log.error(
                    "cascade %s: %s %s cannot be resolved for student %s (%s); serving its "
                    "calibrated default",
                    self.cascade,
                    state.mode,
                    state.target,
                    self.student_version,
                    exc,
                )
                return self._default
            # Resolved for the version served: its stamp names it, so the controller's moves
            # for another version's start are not carried over a swap.
            threshold = state.clamp(got.threshold)
            state = state.model_copy(
                update={
                    "threshold": threshold,
                    "tier_thresholds": got.tiers,
                    "student_version": self.student_version,
                }
            )
        elif state.student_version != self.student_version:
            log.warning(
                "cascade %s: threshold %.4f was set for student %s, now serving %s; keeping it",
                self.cascade,
                state.threshold,
                state.student_version,
                self.student_version,
            )
        return state

    async def set(
        self,
        *,
        threshold: float | None = None,
        target_delegation_rate: float | None = None,
        max_student_error: float | None = None,
        target_accuracy: float | None = None,
        cost_budget: float | None = None,
        min_threshold: float = 0.0,
        max_threshold: float = 1.0,
        actor: str,
    ) -> tuple[PolicyState, PolicyState]:
        """Set a fixed threshold, a target held online, or a target on the frontier (every
        stage's threshold); returns (old, new)."""
        if min_threshold > max_threshold:
            raise InvalidInput("min_threshold must not exceed max_threshold")
        if (target_accuracy is not None or cost_budget is not None) and (
            min_threshold > 0.0 or max_threshold < 1.0
        ):
            # A frontier mode serves whole rows: a clamped row would be no row (and silently
            # ignoring the bounds would let an operator believe they hold).
            raise InvalidInput(
                "min_threshold and max_threshold bound the student's threshold alone; "
                "target_accuracy and cost_budget move every stage's along the frontier and "
                "take neither"
            )
        got = resolve(
            self.calibration,
            threshold=threshold,
            target_delegation_rate=target_delegation_rate,
            max_student_error=max_student_error,
            target_accuracy=target_accuracy,
            cost_budget=cost_budget,
            frontier=self.frontier,
            confidence=self.confidence,
            tiers=self.tiers,
        )
        start, mode = got.threshold, got.mode
        new = PolicyState(
            mode=mode,
            threshold=min(max(start, min_threshold), max_threshold) if mode in BOUNDED else start,
            target_delegation_rate=target_delegation_rate,
            max_student_error=max_student_error,
            target_accuracy=target_accuracy,
            cost_budget=cost_budget,
            tier_thresholds=got.tiers,
            min_threshold=min_threshold,
            max_threshold=max_threshold,
            source="admin",
            student_version=self.student_version,
            updated_at=now(),
            updated_by=actor,
        )
        return await self._write(new, actor)

    async def reset(self, *, actor: str) -> tuple[PolicyState, PolicyState]:
        """Back to the bundle's calibrated default."""
        new = self._default.model_copy(update={"updated_at": now(), "updated_by": actor})
        return await self._write(new, actor, remove=True)

    async def _write(
        self, new: PolicyState, actor: str, remove: bool = False
    ) -> tuple[PolicyState, PolicyState]:
        olds: list[PolicyState] = []

        def change(raw: bytes | None) -> tuple[bytes | None, dict[str, Any]]:
            old = self._load(raw) if raw is not None else self._default
            olds[:] = [old]  # compare-and-set may call this again: the last call counts
            audit = {
                "at": new.updated_at,
                "by": actor,
                "cascade": self.cascade,
                "old": old.threshold,
                "new": new.threshold,
                "old_mode": old.mode,
                "mode": new.mode,
                "source": new.source,
                "target_delegation_rate": new.target_delegation_rate,
                "max_student_error": new.max_student_error,
                "target_accuracy": new.target_accuracy,
                "cost_budget": new.cost_budget,
                "tier_thresholds": new.tier_thresholds,
                "min_threshold": new.min_threshold,
                "max_threshold": new.max_threshold,
            }
            return (None if remove else new.model_dump_json().encode()), audit

        raw = await self.store.update(self.key, change)
        # What was written, not the cache (a follower's read in flight may land after it).
        current = self._default if raw is None else self._load(raw)
        old = olds[0]
        log.warning(
            "cascade %s: threshold %.4f -> %.4f (%s%s) by %s",
            self.cascade,
            old.threshold,
            current.threshold,
            current.mode,
            f" {current.target}" if current.resolved else "",
            actor,
        )
        return old, current
