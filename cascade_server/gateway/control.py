"""Runtime control of the delegation threshold, shared by every worker process.

The state is one small JSON file per cascade, replaced atomically on change. Each worker checks
the file's identity (inode, mtime, size: one stat, about a microsecond) before using the
threshold, so a change made through any worker applies to the next request on every worker, and
survives a restart. Changes are serialised with a file lock and appended to an audit log.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from ..bundle import Calibration

log = logging.getLogger(__name__)
_RACY_NS = 100_000_000


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
    def __init__(
        self,
        state_dir: Path,
        cascade: str,
        *,
        default_threshold: float,
        calibration: Calibration,
        student_version: str,
    ) -> None:
        self.cascade = cascade
        self.path = state_dir / f"{cascade}.threshold.json"
        self.audit_path = state_dir / f"{cascade}.threshold.audit.jsonl"
        self._lock_path = state_dir / f"{cascade}.threshold.lock"
        self.calibration = calibration
        self.student_version = student_version
        self._default = ThresholdState(
            threshold=default_threshold, source="bundle", student_version=student_version
        )
        self._state = self._default
        self._stamp: tuple[int, int, int] | None = None
        state_dir.mkdir(parents=True, exist_ok=True)
        self.current()

    def current(self) -> ThresholdState:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._stamp is not None:
                self._stamp, self._state = None, self._default
            return self._state
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        # File timestamps tick coarsely (jiffies), so two quick writes can leave the same stamp:
        # a file modified in the last moment is re-read regardless (git's "racy" rule).
        if stamp != self._stamp or time.time_ns() - st.st_mtime_ns < _RACY_NS:
            self._state = self._load()
            self._stamp = stamp
        return self._state

    def _load(self) -> ThresholdState:
        try:
            state = ThresholdState.model_validate_json(self.path.read_bytes())
        except (OSError, ValueError) as exc:
            log.error("ignoring unreadable threshold state %s: %s", self.path, exc)
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

    def set(
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
        return self._write(new, actor)

    def reset(self, *, actor: str) -> tuple[ThresholdState, ThresholdState]:
        """Back to the bundle's calibrated default."""
        new = self._default.model_copy(update={"updated_at": now(), "updated_by": actor})
        return self._write(new, actor, remove=True)

    def _write(
        self, new: ThresholdState, actor: str, remove: bool = False
    ) -> tuple[ThresholdState, ThresholdState]:
        with locked(self._lock_path):
            old = self.current()
            if remove:
                self.path.unlink(missing_ok=True)
            else:
                replace_atomically(self.path, new.model_dump_json())
            append_audit(
                self.audit_path,
                {
                    "at": new.updated_at,
                    "by": actor,
                    "cascade": self.cascade,
                    "old": old.threshold,
                    "new": new.threshold,
                    "source": new.source,
                    "target_delegation_rate": new.target_delegation_rate,
                },
            )
            current = self.current()
        log.warning(
            "cascade %s: threshold %.4f -> %.4f (%s) by %s",
            self.cascade,
            old.threshold,
            current.threshold,
            current.source,
            actor,
        )
        return old, current


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock between worker processes (and hosts sharing the directory)."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def replace_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def append_audit(path: Path, entry: dict[str, object]) -> None:
    with open(path, "a") as audit:
        audit.write(json.dumps(entry) + "\n")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
