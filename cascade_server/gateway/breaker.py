"""A circuit breaker for the teacher: after consecutive failures it opens and delegated items are
answered degraded at once, instead of each waiting for the teacher's deadline; after `open_s` it
lets a few probe calls through (half-open) and closes on the first success.

One small class rather than a library: the maintained breakers (pybreaker, aiobreaker) wrap the
call itself, while here the decision (delegate or degrade) is taken per micro-batch before any
call, and the outcome comes back later from a background task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import IntEnum

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)


class BreakerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Consecutive failed teacher calls (timeouts, unavailable, errors) that open the circuit.
    failures: int = Field(default=5, ge=1, le=1000)
    # How long it stays open before letting probes through.
    open_s: float = Field(default=2.0, gt=0, le=600)
    # Calls let through while half-open; the first success closes, a failure reopens.
    probes: int = Field(default=1, ge=1, le=100)


class State(IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        config: BreakerConfig,
        *,
        name: str = "teacher",
        on_change: Callable[[State, State], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.name = name
        self.state = State.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probes = 0
        self._on_change = on_change
        self._clock = clock

    def allow(self) -> bool:
        """May a teacher call be made now? (In half-open, counts the call as a probe.)"""
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN:
            if self._clock() - self._opened_at < self.config.open_s:
                return False
            self._move(State.HALF_OPEN)
            self._probes = 0
        if self._probes < self.config.probes:
            self._probes += 1
            return True
        return False

    def success(self) -> None:
        self._failures = 0
        if self.state is not State.CLOSED:
            self._move(State.CLOSED)

    def failure(self) -> None:
        self._failures += 1
        if self.state is State.HALF_OPEN or (
            self.state is State.CLOSED and self._failures >= self.config.failures
        ):
            self._opened_at = self._clock()
            self._move(State.OPEN)

    def _move(self, new: State) -> None:
        old, self.state = self.state, new
        level = logging.WARNING if new is State.OPEN else logging.INFO
        log.log(level, "%s circuit %s -> %s", self.name, old.name.lower(), new.name.lower())
        if self._on_change is not None:
            self._on_change(old, new)
