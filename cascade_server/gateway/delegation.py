"""The teacher stage: its client, circuit breaker and in-flight bound, the load it reports to the
router, and the background calls that answer delegated items.

One call per micro-batch carries every item the router sent; it runs in a task of its own while
the collector moves on to the next batch, and resolves the requests that waited for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import numpy as np

from ..config.teacher import TeacherConfig
from ..errors import TeacherUnavailable
from ..policy import NonFiniteLogits, softmax
from .breaker import CircuitBreaker, State, Ticket
from .metrics import Metrics
from .routing import Load
from .supervise import BurstLog
from .teacher import Teacher

log = logging.getLogger(__name__)
# What a finished call hands back: the teacher's probabilities for the items sent, or the
# reason it failed (a TeacherUnavailable kind: the items are answered degraded), or an
# unexpected exception (a bug: the waiting requests answer 500).
Done = Callable[[np.ndarray | None, str | None, Exception | None], None]


class TeacherStage:
    def __init__(
        self,
        cascade: str,
        teacher: Teacher,
        config: TeacherConfig,
        metrics: Metrics,
        n_classes: int,
    ) -> None:
        self.cascade = cascade
        self.teacher = teacher
        self.config = config
        self.metrics = metrics
        self.n_classes = n_classes
        self.breaker = CircuitBreaker(
            config.breaker,
            name=f"cascade {cascade}: teacher {teacher.name}",
            on_change=self._circuit_changed,
        )
        self.calls: set[asyncio.Task[None]] = set()
        self.ready = False
        self._failures = BurstLog(logger=log)

    def _circuit_changed(self, old: State, new: State) -> None:
        self.metrics.circuit(self.cascade, int(new), new.name.lower())

    async def setup(self) -> None:
        await self.teacher.setup()
        # Opens the gRPC channel now rather than on the first delegated request; a teacher
        # that is down is not fatal here (/readyz reports it, requests are answered anyway).
        self.ready = await self.teacher.ready()

    async def check_ready(self) -> bool:
        ready = await self.teacher.ready()
        if ready != self.ready:
            log.warning(
                "cascade %s: teacher %s is %s",
                self.cascade,
                self.teacher.name,
                "ready" if ready else "not ready",
            )
        self.ready = ready
        return ready

    async def close(self) -> None:
        for task in list(self.calls):
            task.cancel()
        await asyncio.gather(*self.calls, return_exceptions=True)
        await self.teacher.close()

    def load(self) -> tuple[Load, Ticket | None]:
        """The teacher's room now, and the breaker's ticket for a call (None: no call may be
        made). A ticket not used must be given back with `release`."""
        if len(self.calls) >= self.config.max_in_flight:
            return Load(room=0), None
        ticket = self.breaker.allow()
        if ticket is None:
            return Load(room=0, circuit_open=True), None
        return Load(), ticket

    def release(self, ticket: Ticket | None) -> None:
        if ticket is not None:
            self.breaker.release(ticket)

    def call(
        self,
        feeds: dict[str, np.ndarray],
        n: int,
        ticket: Ticket,
        done: Done,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Starts the teacher call for `n` items in the background; `done` gets the result.
        `headers`: gRPC metadata (the W3C trace context, when traced)."""
        task = asyncio.get_running_loop().create_task(self._call(feeds, n, ticket, done, headers))
        self.calls.add(task)
        task.add_done_callback(self.calls.discard)

    async def _call(
        self,
        feeds: dict[str, np.ndarray],
        n: int,
        ticket: Ticket,
        done: Done,
        headers: dict[str, str] | None,
    ) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        error: str | None = None
        probs: np.ndarray | None = None
        unexpected: Exception | None = None
        try:
            logits = await self.teacher.infer(feeds, headers)
            if logits.shape != (n, self.n_classes):
                raise TeacherUnavailable(
                    "error",
                    f"teacher returned logits of shape {logits.shape}; expected "
                    f"{(n, self.n_classes)}",
                )
            try:
                probs = softmax(logits)
            except NonFiniteLogits:
                raise TeacherUnavailable("error", "teacher returned non-finite logits") from None
            self.breaker.success(ticket)
        except TeacherUnavailable as exc:
            error = exc.kind
            self.breaker.failure(ticket)
            self._failures(
                "cascade %s: teacher %s failed (%s); answering with the student",
                self.cascade,
                self.teacher.name,
                exc,
            )
        except asyncio.CancelledError:
            self.breaker.release(ticket)  # no outcome: a half-open probe slot comes back
            raise
        except Exception as exc:  # a bug, not a teacher outage: those requests answer 500
            error, unexpected = "error", exc
            self.breaker.failure(ticket)
        finally:
            self.metrics.teacher_call(self.cascade, n, loop.time() - t0, error)
        done(probs, error, unexpected)
