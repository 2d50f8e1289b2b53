"""The per-batch path, as named steps: student -> decide -> route -> answer now, and the teacher
in the background for what was sent.

One micro-batch is one student call, one routing decision per item (routing.py), and at most one
teacher call carrying every sent item of every request in the batch. Requests with nothing sent
are answered at once; the others when the teacher has answered. Answers are identical whether a
request was batched with others or alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from ..errors import Overloaded
from ..policy import class_probabilities, decide
from ..preprocess import Batch
from .answers import Answer
from .batcher import Job
from .delegation import TeacherStage
from .metrics import Metrics
from .options import RequestOptions
from .outcomes import BY_TEACHER, Outcome
from .routing import Load, Mode, route
from .shadow import Shadow
from .supervise import BurstLog
from .tracing import RequestTrace, Tracing
from .version import StudentVersion

log = logging.getLogger(__name__)
_AUTO, _ALWAYS = int(Mode.AUTO), int(Mode.ALWAYS)  # plain ints: enum lookups cost per batch
_FAILED = int(Outcome.TEACHER_FAILED)


@dataclass(frozen=True)
class Work:
    """What a request hands the micro-batcher: its preprocessed inputs, on the version it
    started with, its own options (when it asked for any) and its trace (when traced)."""

    version: StudentVersion
    batch: Batch
    trace: RequestTrace | None = None
    options: RequestOptions | None = None


BatchJob = Job[Work, Answer]


class BatchObserver(Protocol):
    """Who watches the batches (the live window, shadow sampling). Never fails a request:
    the path calls it through `_observe`, which logs and drops errors."""

    def routed(self, margins: np.ndarray, delegated: int) -> None: ...
    def answered(self, student_margins: np.ndarray, teacher_items: int) -> None: ...


class BatchPath:
    def __init__(
        self,
        cascade: str,
        n_classes: int,
        teacher: TeacherStage,
        metrics: Metrics,
        threshold: Callable[[StudentVersion], float],
        retry_after_s: int = 1,
        tracing: Tracing | None = None,
        observer: BatchObserver | None = None,
        shadow: Shadow | None = None,
        accuracy_floor: float | None = None,
    ) -> None:
        self.tracing = tracing
        self.cascade = cascade
        self.n_classes = n_classes
        self.teacher = teacher
        self.metrics = metrics
        self.threshold = threshold
        self.retry_after_s = retry_after_s
        self.observer = observer
        self.shadow = shadow
        self.accuracy_floor = accuracy_floor
        self._floors: dict[int, float] = {}  # per student version: the floor as a threshold
        self._observer_failures = BurstLog(logger=log)

    def __call__(self, jobs: list[BatchJob]) -> None:
        """Jobs by student version (one group, except around a swap)."""
        first = jobs[0].payload.version
        if all(job.payload.version is first for job in jobs):
            self._run(first, jobs)
            return
        groups: dict[int, list[BatchJob]] = {}
        for job in jobs:
            groups.setdefault(id(job.payload.version), []).append(job)
        for group in groups.values():
            self._run(group[0].payload.version, group)

    def _run(self, version: StudentVersion, jobs: list[BatchJob]) -> None:
        started = asyncio.get_running_loop().time()
        waits = [started - job.queued_at for job in jobs]
        payloads = [job.payload for job in jobs]
        batch = Batch.concat([w.batch for w in payloads])
        n = len(batch)
        starts = np.cumsum([0] + [job.size for job in jobs])
        # Step 1: the student.
        t0, t0_ns = time.perf_counter(), time.time_ns()
        logits = version.student.predict(version.feeds(batch))
        student_s = time.perf_counter() - t0
        tracing = self.tracing is not None and self.tracing.enabled
        traced = [w.trace for w in payloads if w.trace is not None] if tracing else None
        if traced:
            end_ns = time.time_ns()
            for trace in traced:
                trace.stage("queue", trace.marks["preprocessed"], t0_ns)
                trace.stage("student", t0_ns, end_ns, batch_items=n)
        # Step 2: what the policy wants (margin against the threshold, or the request's own;
        # delegating classes), and the requests' own options.
        threshold = self.threshold(version)
        asked = any([w.options is not None for w in payloads])
        items = _ItemOptions.of(jobs, starts, threshold, n) if asked else None
        decision = decide(logits, threshold if items is None else items.threshold, **version.policy)
        probs = class_probabilities(decision.probs, version.manifest.output_classes, self.n_classes)
        if probs is decision.probs:
            probs = probs.copy()  # teacher rows are written into it
        # Step 3: one routing decision per item, against the teacher's load now.
        wanted = decision.delegate
        if items is not None:
            wanted = wanted | (items.mode == _ALWAYS)
        if wanted.any():
            load, ticket = self.teacher.load()
            if self.accuracy_floor is not None:
                load = replace(load, floor_threshold=self._floor(version))
        else:
            load, ticket = Load(), None
        routes = route(
            decision.margins,
            decision.delegate,
            load,
            mode=None if items is None else items.mode,
            budget_s=None if items is None else items.budget(time.perf_counter()),
        )
        sent = routes.send
        if not sent.size:
            self.teacher.release(ticket)
        shown = threshold if items is None else items.threshold
        answer = Answer(probs, decision.margins, routes.outcome, shown, student_s)
        self.metrics.student_batch(self.cascade, decision.margins, student_s)
        settled = np.ones(n, dtype=bool)
        settled[sent] = False
        self.metrics.items(self.cascade, routes.outcome[settled])
        calibration = version.manifest.calibration
        self.metrics.savings(
            self.cascade, n, int(sent.size), calibration.cost_student, calibration.cost_teacher
        )
        routed = slice(None) if items is None else items.mode == _AUTO
        self._observe("routed", decision.margins[routed], int(decision.delegate[routed].sum()))
        by_student = settled & ~BY_TEACHER[routes.outcome]
        self._observe("answered", decision.margins[by_student], 0)
        if self.shadow is not None:
            self.shadow.offer(version, batch, decision.margins, by_student, probs)
        # Step 4: answer what is decided; refuse what the accuracy floor does not allow.
        waiting = _jobs_holding(starts, sent, len(jobs))
        shed = _jobs_holding(starts, np.flatnonzero(routes.shed), len(jobs))
        for j in np.flatnonzero(shed):
            jobs[j].future.set_exception(
                Overloaded(
                    "the teacher is saturated and this input is below the cascade's accuracy "
                    f"floor; retry after {self.retry_after_s}s",
                    self.retry_after_s,
                )
            )
        _resolve(jobs, answer, starts, waits, ~waiting & ~shed)
        if not sent.size:
            return
        # Step 5: the teacher, in the background, for what was sent.
        assert ticket is not None
        called = time.perf_counter()
        spans, headers = self._teacher_spans(jobs, waiting, sent.size)

        def done(
            teacher_probs: np.ndarray | None, error: str | None, exc: Exception | None
        ) -> None:
            answer.teacher_s = time.perf_counter() - called
            for span in spans:
                span.set_attribute("cascade.teacher.error", error or "")
                span.end()
            if exc is not None:
                for j in np.flatnonzero(waiting & ~shed):
                    if not jobs[j].future.done():
                        jobs[j].future.set_exception(exc)
                return
            if teacher_probs is None:
                answer.outcome[sent] = _FAILED
                self._observe("answered", decision.margins[sent], 0)
            else:
                answer.probs[sent] = teacher_probs
                self._observe("answered", decision.margins[:0], int(sent.size))
            self.metrics.items(self.cascade, answer.outcome[sent])
            _resolve(jobs, answer, starts, waits, waiting & ~shed)

        feeds = version.teacher_feeds(batch.take(sent))
        self.teacher.call(feeds, sent.size, ticket, done, headers)

    def _observe(self, what: str, margins: np.ndarray, count: int) -> None:
        if self.observer is None:
            return
        try:
            getattr(self.observer, what)(margins, count)
        except Exception as exc:  # an observer never fails a request
            self._observer_failures("cascade %s: observer failed: %r", self.cascade, exc)

    def _floor(self, version: StudentVersion) -> float:
        """The accuracy floor as a threshold for this version: items below it are not left to
        the student alone under load."""
        key = id(version)
        if key not in self._floors:
            assert self.accuracy_floor is not None
            try:
                value = version.manifest.calibration.threshold_for_accuracy(self.accuracy_floor)
            except ValueError:  # the calibration never reaches it: every delegated item counts
                value = 1.0
            self._floors = {key: value}  # one version at a time (two around a swap)
        return self._floors[key]

    def _teacher_spans(
        self, jobs: list[BatchJob], waiting: np.ndarray, n: int
    ) -> tuple[list[Any], dict[str, str] | None]:
        """A live teacher span for each traced request waiting on the call; the first one's
        context goes to Triton."""
        traces = [jobs[j].payload.trace for j in np.flatnonzero(waiting)]
        spans = [t.start_stage("teacher", batch_items=n) for t in traces if t is not None]
        if not spans or self.tracing is None:
            return spans, None
        return spans, self.tracing.headers_for(spans[0])


@dataclass
class _ItemOptions:
    """The requests' options spread over their items."""

    threshold: np.ndarray
    mode: np.ndarray
    deadline: np.ndarray  # perf_counter, inf: none

    @classmethod
    def of(cls, jobs: list[BatchJob], starts: np.ndarray, threshold: float, n: int) -> _ItemOptions:
        out = cls(np.full(n, threshold), np.zeros(n, np.int8), np.full(n, np.inf))
        for j, job in enumerate(jobs):
            opts = job.payload.options
            if opts is None:
                continue
            rows = slice(int(starts[j]), int(starts[j + 1]))
            if opts.threshold is not None:
                out.threshold[rows] = opts.threshold
            out.mode[rows] = opts.mode
            if opts.deadline is not None:
                out.deadline[rows] = opts.deadline
        return out

    def budget(self, now: float) -> np.ndarray:
        return self.deadline - now


def _jobs_holding(starts: np.ndarray, items: np.ndarray, n_jobs: int) -> np.ndarray:
    """Which jobs hold at least one of `items` (indices into the batch)."""
    held = np.zeros(n_jobs, dtype=bool)
    if items.size:
        held[np.searchsorted(starts, items, side="right") - 1] = True
    return held


def _resolve(
    jobs: list[BatchJob],
    answer: Answer,
    starts: np.ndarray,
    waits: list[float],
    which: np.ndarray,
) -> None:
    """Hands each chosen job its rows of the batch's answer."""
    for j in np.flatnonzero(which):
        job = jobs[j]
        if not job.future.done():
            job.future.set_result(answer.rows(int(starts[j]), int(starts[j + 1]), waits[j]))
