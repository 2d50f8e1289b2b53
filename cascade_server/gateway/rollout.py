"""Which student version each cascade serves, shared by every worker and kept across restarts:
one small JSON file per cascade in the state directory, replaced atomically under a lock, with
an audit log. Workers read it in the background (cascade.py's watch loop), not per request."""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel

from .control import append_audit, locked, now, replace_atomically

log = logging.getLogger(__name__)


class RolloutState(BaseModel):
    bundle: str  # the bundle directory to serve
    version: str  # its student version, for the record
    previous: str | None = None  # the bundle it replaced: what a rollback returns to
    updated_at: str
    updated_by: str


class RolloutStore:
    def __init__(self, state_dir: Path, cascade: str) -> None:
        self.cascade = cascade
        self.path = state_dir / f"{cascade}.student.json"
        self.audit_path = state_dir / f"{cascade}.student.audit.jsonl"
        self._lock_path = state_dir / f"{cascade}.student.lock"
        state_dir.mkdir(parents=True, exist_ok=True)

    def read(self) -> RolloutState | None:
        try:
            return RolloutState.model_validate_json(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.error("ignoring unreadable rollout state %s: %s", self.path, exc)
            return None

    def write(self, bundle: Path, previous: Path, version: str, actor: str) -> RolloutState:
        state = RolloutState(
            bundle=str(bundle),
            version=version,
            previous=str(previous),
            updated_at=now(),
            updated_by=actor,
        )
        with locked(self._lock_path):
            replace_atomically(self.path, state.model_dump_json())
            append_audit(self.audit_path, {"cascade": self.cascade, **state.model_dump()})
        return state
