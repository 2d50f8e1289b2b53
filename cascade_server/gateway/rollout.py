"""Which student version each cascade serves, shared by every worker and replica and kept across
restarts, in the control store (stores.py) with an audit log. Workers read it in the background
(cascade.py's watch loop), not per request."""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel

from .stores import ControlStore, now

log = logging.getLogger(__name__)


class RolloutState(BaseModel):
    bundle: str  # the bundle directory to serve
    version: str  # its student version, for the record
    previous: str | None = None  # the bundle it replaced: what a rollback returns to
    updated_at: str
    updated_by: str


class RolloutStore:
    def __init__(self, store: ControlStore, cascade: str) -> None:
        self.store = store
        self.cascade = cascade
        self.key = f"{cascade}.student"

    def read(self) -> RolloutState | None:
        _, raw = self.store.read(self.key)
        if raw is None:
            return None
        try:
            return RolloutState.model_validate_json(raw)
        except ValueError as exc:
            log.error("ignoring unreadable rollout state %s: %s", self.key, exc)
            return None

    async def write(
        self, bundle: Path, previous: str | None, version: str, actor: str
    ) -> RolloutState:
        state = RolloutState(
            bundle=str(bundle),
            version=version,
            previous=previous,
            updated_at=now(),
            updated_by=actor,
        )
        await self.store.update(
            self.key,
            lambda _: (
                state.model_dump_json().encode(),
                {"cascade": self.cascade, **state.model_dump()},
            ),
        )
        return state
