"""Runtime control of the delegation threshold, shared by every worker process and replica.

The state lives in the control store (stores.py: a file per cascade, or Redis); every use reads
the store's in-process view, so a change made through any worker applies to the next request
on every worker, survives a restart, and is appended to an audit log.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, Field

from ..bundle import Calibration
from .stores import ControlStore, now

log = logging.getLogger(__name__)


class ThresholdState(BaseModel):
    threshold: float = Field(ge=0.0, le=1.0)
    # bundle: the student's calibrated default; admin: set at runtime.
    source: Literal["bundle", "admin"]
    # Set when the admin asked for a delegation rate rather than a threshold: it is re-resolved
    # against the calibration of whichever student version is loaded.
    target_delegation_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    student_version: str
    updated_at: str | None = None
    updated_by: str | None = None


class ThresholdStore:
    """The threshold of one cascade for one student version: the bundle's calibrated default,
    or what an admin set (a threshold, or a target rate resolved through this version's
    calibration), kept in the shared state backend (stores.py)."""

    def __init__(
        self,
        store: ControlStore,
        cascade: str,
        *,
        default_threshold: float,
        calibration: Calibration,
        student_version: str,
    ) -> None:
        self.store = store
        self.cascade = cascade
        self.key = f"{cascade}.threshold"
        self.calibration = calibration
        self.student_version = student_version
        self._default = ThresholdState(
            threshold=default_threshold, source="bundle", student_version=student_version
        )
        self._state = self._default
        self._stamp: object = None
        self.current()

    def current(self) -> ThresholdState:
        stamp, raw = self.store.read(self.key)
        if raw is None:
            self._stamp, self._state = None, self._default
        elif stamp != self._stamp:
            self._state = self._load(raw)
            self._stamp = stamp
        return self._state

    def _load(self, raw: bytes) -> ThresholdState:
        try:
            state = ThresholdState.model_validate_json(raw)
        except ValueError as exc:
            log.error("ignoring unreadable threshold state %s: %s", self.key, exc)
            return self._default
        if state.target_delegation_rate is not None:
            resolved = self.calibration.threshold_for_rate(state.target_delegation_rate)
            state = state.model_copy(update={"threshold": resolved})
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
        actor: str,
    ) -> tuple[ThresholdState, ThresholdState]:
        """Set a threshold, or a target rate resolved through the calibration table."""
        if (threshold is None) == (target_delegation_rate is None):
            raise ValueError("give exactly one of threshold and target_delegation_rate")
        if target_delegation_rate is not None:
            threshold = self.calibration.threshold_for_rate(target_delegation_rate)
        assert threshold is not None
        new = ThresholdState(
            threshold=threshold,
            source="admin",
            target_delegation_rate=target_delegation_rate,
            student_version=self.student_version,
            updated_at=now(),
            updated_by=actor,
        )
        return await self._write(new, actor)

    async def reset(self, *, actor: str) -> tuple[ThresholdState, ThresholdState]:
        """Back to the bundle's calibrated default."""
        new = self._default.model_copy(update={"updated_at": now(), "updated_by": actor})
        return await self._write(new, actor, remove=True)

    async def _write(
        self, new: ThresholdState, actor: str, remove: bool = False
    ) -> tuple[ThresholdState, ThresholdState]:
        olds: list[ThresholdState] = []

        def change(raw: bytes | None) -> tuple[bytes | None, dict[str, Any]]:
            old = self._load(raw) if raw is not None else self._default
            olds[:] = [old]  # compare-and-set may call this again: the last call counts
            audit = {
                "at": new.updated_at,
                "by": actor,
                "cascade": self.cascade,
                "old": old.threshold,
                "new": new.threshold,
                "source": new.source,
                "target_delegation_rate": new.target_delegation_rate,
            }
            return (None if remove else new.model_dump_json().encode()), audit

        await self.store.update(self.key, change)
        current = self.current()
        old = olds[0]
        log.warning(
            "cascade %s: threshold %.4f -> %.4f (%s) by %s",
            self.cascade,
            old.threshold,
            current.threshold,
            current.source,
            actor,
        )
        return old, current
