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
  higher.

The state lives in the control store (stores.py); every use reads the store's in-process view,
so a change made through any worker applies to the next batch on every worker and survives a
restart. The controller's moves are not here: they are its own state, and metrics.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from ..bundle import Calibration
from ..errors import InvalidInput
from .stores import ControlStore, now

log = logging.getLogger(__name__)
Mode = Literal["threshold", "target_delegation_rate", "max_student_error"]
ONLINE: tuple[Mode, ...] = ("target_delegation_rate", "max_student_error")


class PolicyState(BaseModel):
    mode: Mode = "threshold"
    # The threshold in force before the controller moves it: the fixed one, or what the
    # calibration gives for the target (resolved for the student version loaded).
    threshold: float = Field(ge=0.0, le=1.0)
    target_delegation_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    max_student_error: float | None = Field(default=None, ge=0.0, le=1.0)
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
    def target(self) -> float | None:
        return (
            self.target_delegation_rate
            if self.mode == "target_delegation_rate"
            else (self.max_student_error if self.mode == "max_student_error" else None)
        )

    def stamp(self) -> str:
        """Identifies this policy: the controller's moves are for one policy only."""
        return f"{self.mode}:{self.target}:{self.updated_at}:{self.student_version}"

    def clamp(self, value: float) -> float:
        return min(max(value, self.min_threshold), self.max_threshold)


def resolve(
    calibration: Calibration,
    *,
    threshold: float | None = None,
    target_delegation_rate: float | None = None,
    max_student_error: float | None = None,
    confidence: float = 0.95,
) -> tuple[Mode, float]:
    """The mode asked for and its starting threshold on this calibration."""
    given = [v is not None for v in (threshold, target_delegation_rate, max_student_error)]
    if sum(given) != 1:
        raise ValueError(
            "give exactly one of threshold, target_delegation_rate and max_student_error"
        )
    if threshold is not None:
        return "threshold", threshold
    if target_delegation_rate is not None:
        return "target_delegation_rate", calibration.threshold_for_rate(target_delegation_rate)
    assert max_student_error is not None
    try:
        return "max_student_error", calibration.threshold_for_student_error(
            max_student_error, confidence
        )
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


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
        confidence: float = 0.95,
    ) -> None:
        self.store = store
        self.cascade = cascade
        self.key = f"{cascade}.threshold"
        self.calibration = calibration
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
        if state.online:
            try:
                _, start = resolve(
                    self.calibration,
                    **{state.mode: state.target},
                    confidence=self.confidence,
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
            state = state.model_copy(
                update={"threshold": state.clamp(start), "student_version": self.student_version}
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
        min_threshold: float = 0.0,
        max_threshold: float = 1.0,
        actor: str,
    ) -> tuple[PolicyState, PolicyState]:
        """Set a fixed threshold, or a target held online; returns (old, new)."""
        if min_threshold > max_threshold:
            raise InvalidInput("min_threshold must not exceed max_threshold")
        mode, start = resolve(
            self.calibration,
            threshold=threshold,
            target_delegation_rate=target_delegation_rate,
            max_student_error=max_student_error,
            confidence=self.confidence,
        )
        new = PolicyState(
            mode=mode,
            threshold=start
            if mode == "threshold"
            else min(max(start, min_threshold), max_threshold),
            target_delegation_rate=target_delegation_rate,
            max_student_error=max_student_error,
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
            f" {current.target}" if current.online else "",
            actor,
        )
        return old, current
