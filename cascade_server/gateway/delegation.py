"""The teacher stage: its client, circuit breaker and in-flight bounds, the load it reports to
the router, and the background calls that answer delegated items.

One call per micro-batch carries every item the router sent; it runs in a task of its own while
the collector moves on to the next batch, and resolves the requests that waited for it.

Load-aware delegation: besides the bound on calls in flight, the items in flight are bounded by
a limit that, given a latency objective (`slo_s`), follows the teacher (additive increase while
its calls answer within the SLO, multiplicative decrease when one does not: TCP's AIMD, as
concurrency limiters do it). The router sends the lowest-margin delegated items first, as many
as the limit leaves room for, and the student answers the rest (`teacher_busy`). The teacher's
recent latencies give the p95 that request deadlines are checked against.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Protocol

import numpy as np

from ..config.delegation import LoadConfig
from ..config.teacher import TeacherConfig
from ..errors import TeacherUnavailable
from ..policy import NonFiniteLogits, softmax
from .breaker import CircuitBreaker, State, Ticket
from .routing import Load
from .supervise import BurstLog
from .teacher import Teacher

log = logging.getLogger(__name__)
# What a finished call hands back: the teacher's probabilities for the items sent, or the
# reason it failed (a TeacherUnavailable kind: the items are answered degraded), or an
# unexpected exception (a bug: the waiting requests answer 500).
Done = Callable[[np.ndarray | None, str | None, Exception | None], None]


class StageMetrics(Protocol):
    """What a stage reports (the gateway's Metrics for the teacher; hops.TierMetrics for a
    tier on Triton)."""

    def circuit(self, cascade: str, state: int, name: str) -> None: ...
    def teacher_call(self, cascade: str, n: int, seconds: float, error: str | None) -> None: ...
    def teacher_limit(self, cascade: str, limit: float) -> None: ...


class TeacherStage:
    def __init__(
        self,
        cascade: str,
        teacher: Teacher,
        config: TeacherConfig,
        metrics: StageMetrics,
        n_classes: int,
        load: LoadConfig | None = None,
    ) -> None:
        self.cascade = cascade
        self.teacher = teacher
        self.config = config
        self.load_config = load or LoadConfig()
        self.metrics = metrics
        self.n_classes = n_classes
        cfg = self.load_config
        self.limit = float(
            cfg.max_items_in_flight
            if cfg.slo_s is None
            else min(
                max(cfg.initial_items_in_flight, cfg.min_items_in_flight), cfg.max_items_in_flight
            )
        )
        self.items_in_flight = 0
        self._latencies: deque[float] = deque(maxlen=self.load_config.latency_window)
        self._p95: float | None = None
        self.breaker = CircuitBreaker(
            config.breaker,
            name=f"cascade {cascade}: teacher {teacher.name}",
            on_change=self._circuit_changed,
        )
        self.calls: set[asyncio.Task[None]] = set()
        self.ready = False
        self.closed = False  # no call starts after close (its items keep their answer)
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
        self.closed = True
        for task in list(self.calls):
            task.cancel()
        await asyncio.gather(*self.calls, return_exceptions=True)
        await self.teacher.close()

    def load(self, with_p95: bool = True) -> tuple[Load, Ticket | None]:
        """The teacher's room now, and the breaker's ticket for a call (None: no call may be
        made). A ticket not used must be given back with `release`. An open circuit is said
        first: while hung calls still fill the bounds, the items are degraded, not busy."""
        p95 = self.p95() if with_p95 else None
        if self.closed:
            return Load(room=0, p95_s=p95), None
        if self.breaker.is_open():
            return Load(room=0, circuit_open=True, p95_s=p95), None
        if len(self.calls) >= self.config.max_in_flight:
            return Load(room=0, p95_s=p95), None
        room = int(self.limit) - self.items_in_flight
        if room <= 0:
            return Load(room=0, p95_s=p95), None
        ticket = self.breaker.allow()
        if ticket is None:
            return Load(room=0, circuit_open=True, p95_s=p95), None
        return Load(room=room, p95_s=p95), ticket

    def spare(self) -> bool:
        """Room to spare beyond real traffic (for shadow samples): under half the limit used."""
        return self.items_in_flight < self.limit / 2

    def p95(self) -> float | None:
        """The teacher's p95 latency over its recent calls (None until it has answered)."""
        if self._p95 is None and len(self._latencies) >= 5:
            self._p95 = float(np.percentile(np.fromiter(self._latencies, float), 95))
        return self._p95

    def _observed(self, seconds: float, n: int, ok: bool) -> None:
        """A call's latency: the p95 window, and the AIMD limit against the SLO."""
        self._latencies.append(seconds)
        self._p95 = None  # recomputed on the next read
        slo, cfg = self.load_config.slo_s, self.load_config
        if slo is None:
            return
        if not ok or seconds > slo:
            self.limit = max(cfg.min_items_in_flight, self.limit * cfg.backoff)
        else:
            self.limit = min(cfg.max_items_in_flight, self.limit + max(n, 1) / max(self.limit, 1))
        self.metrics.teacher_limit(self.cascade, self.limit)

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
        started: list[bool] = []
        task = asyncio.get_running_loop().create_task(
            self._call(feeds, n, ticket, done, headers, started)
        )
        self.calls.add(task)
        self.items_in_flight += n

        def finished(task: asyncio.Task[None]) -> None:
            self.calls.discard(task)
            self.items_in_flight -= n
            if task.cancelled() and not started:
                # Cancelled before its first step (a close right after the call): the body
                # never ran, so nothing answered the items or gave the ticket back.
                self.breaker.release(ticket)
                done(None, "cancelled", None)

        task.add_done_callback(finished)

    async def _call(
        self,
        feeds: dict[str, np.ndarray],
        n: int,
        ticket: Ticket,
        done: Done,
        headers: dict[str, str] | None,
        started: list[bool],
    ) -> None:
        started.append(True)
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
            # The waiting requests are answered by the student (shutdown cancels calls). Not
            # a teacher error: nothing is counted against it (its alert stays quiet).
            done(None, "cancelled", None)
            raise
        except Exception as exc:  # a bug, not a teacher outage: those requests answer 500
            error, unexpected = "error", exc
            self.breaker.failure(ticket)
        seconds = loop.time() - t0
        self.metrics.teacher_call(self.cascade, n, seconds, error)
        self._observed(seconds, n, error is None)
        done(probs, error, unexpected)
