"""A circuit breaker for the teacher: after consecutive failures it opens and delegated items are
answered by the student at once, instead of each waiting for the teacher's deadline; after
`open_s` it lets a few probe calls through (half-open) and closes on the first success.

One small class rather than a library: the maintained breakers (pybreaker, aiobreaker) wrap the
call itself, while here the decision (call the teacher or not) is taken per micro-batch before
any call, and the outcome comes back later from a background task. So every call that `allow`
lets through holds a `Ticket` and reports on it exactly once (success, failure, or release when
it ends without an outcome, e.g. cancelled), and a ticket from before the circuit last opened
counts for nothing: a late success of a call started while the teacher was still healthy must
not close a circuit its failures opened since.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from ..config.breaker import BreakerConfig

log = logging.getLogger(__name__)

__all__ = ["BreakerConfig", "CircuitBreaker", "State", "Ticket"]


class State(IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


@dataclass(eq=False)
class Ticket:
    """One call let through. `epoch`: how many times the circuit had opened when it was issued;
    `probe`: a half-open probe, whose slot comes back when it reports."""

    epoch: int
    probe: bool
    done: bool = False


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
        self._epoch = 0
        self._probes = 0  # probes out now (half-open)
        self._on_change = on_change
        self._clock = clock

    def allow(self) -> Ticket | None:
        """A ticket when a teacher call may be made now, else None."""
        if self.state is State.OPEN:
            if self._clock() - self._opened_at < self.config.open_s:
                return None
            self._move(State.HALF_OPEN)
            self._probes = 0
        if self.state is State.CLOSED:
            return Ticket(self._epoch, probe=False)
        if self._probes < self.config.probes:
            self._probes += 1
            return Ticket(self._epoch, probe=True)
        return None

    def is_open(self) -> bool:
        """Open and not due for a probe (takes no ticket, changes nothing)."""
        return self.state is State.OPEN and self._clock() - self._opened_at < self.config.open_s

    def success(self, ticket: Ticket) -> None:
        if not self._settle(ticket):
            return
        self._failures = 0
        if self.state is not State.CLOSED:
            self._move(State.CLOSED)

    def failure(self, ticket: Ticket) -> None:
        if not self._settle(ticket):
            return
        self._failures += 1
        if self.state is State.HALF_OPEN or (
            self.state is State.CLOSED and self._failures >= self.config.failures
        ):
            self._opened_at = self._clock()
            self._epoch += 1
            self._move(State.OPEN)

    def release(self, ticket: Ticket) -> None:
        """The call ended with no outcome (cancelled): its probe slot comes back."""
        self._settle(ticket)

    def _settle(self, ticket: Ticket) -> bool:
        """Marks the ticket used; True when its outcome still counts."""
        if ticket.done:
            return False
        ticket.done = True
        if ticket.probe and self.state is State.HALF_OPEN and ticket.epoch == self._epoch:
            self._probes = max(self._probes - 1, 0)
        return ticket.epoch == self._epoch and self.state is not State.OPEN

    def _move(self, new: State) -> None:
        old, self.state = self.state, new
        level = logging.WARNING if new is State.OPEN else logging.INFO
        log.log(level, "%s circuit %s -> %s", self.name, old.name.lower(), new.name.lower())
        if self._on_change is not None:
            self._on_change(old, new)
