"""The per-batch path, as named steps: student -> decide -> route -> answer now, and the teacher
in the background for what was sent.

One micro-batch is one student call, one routing decision per item (routing.py), and at most one
teacher call carrying every sent item of every request in the batch. Requests with nothing sent
are answered at once; the others when the teacher has answered. Answers are identical whether a
request was batched with others or alone.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import Overloaded
from ..policy import class_probabilities, decide
from ..preprocess import Batch
from .answers import Answer
from .batcher import Job
from .delegation import TeacherStage
from .metrics import Metrics
from .outcomes import Outcome
from .routing import Load, route
from .tracing import RequestTrace, Tracing
from .version import StudentVersion


@dataclass(frozen=True)
class Work:
    """What a request hands the micro-batcher: its preprocessed inputs, on the version it
    started with (and its trace, when it is traced)."""

    version: StudentVersion
    batch: Batch
    trace: RequestTrace | None = None


BatchJob = Job[Work, Answer]


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
    ) -> None:
        self.tracing = tracing
        self.cascade = cascade
        self.n_classes = n_classes
        self.teacher = teacher
        self.metrics = metrics
        self.threshold = threshold
        self.retry_after_s = retry_after_s

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
        batch = Batch.concat([job.payload.batch for job in jobs])
        # Step 1: the student.
        t0, t0_ns = time.perf_counter(), time.time_ns()
        logits = version.student.predict(version.feeds(batch))
        student_s = time.perf_counter() - t0
        traced = [job.payload.trace for job in jobs if job.payload.trace is not None]
        if traced:
            end_ns = time.time_ns()
            for trace in traced:
                trace.stage("queue", trace.marks["preprocessed"], t0_ns)
                trace.stage("student", t0_ns, end_ns, batch_items=len(batch))
        # Step 2: what the policy wants (margin against the threshold, delegating classes).
        threshold = self.threshold(version)
        decision = decide(logits, threshold, **version.policy)
        probs = class_probabilities(decision.probs, version.manifest.output_classes, self.n_classes)
        if probs is decision.probs:
            probs = probs.copy()  # teacher rows are written into it
        # Step 3: one routing decision per item, against the teacher's load now.
        load, ticket = self.teacher.load() if decision.delegate.any() else (Load(), None)
        routes = route(decision.margins, decision.delegate, load)
        sent = routes.send
        if not sent.size:
            self.teacher.release(ticket)
        answer = Answer(probs, decision.margins, routes.outcome, threshold, student_s)
        self.metrics.student_batch(self.cascade, decision.margins, student_s)
        settled = np.ones(len(batch), dtype=bool)
        settled[sent] = False
        self.metrics.items(self.cascade, routes.outcome[settled])
        # Step 4: answer what is decided; refuse what the accuracy floor does not allow.
        starts = np.cumsum([0] + [job.size for job in jobs])
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
                answer.outcome[sent] = Outcome.TEACHER_FAILED
            else:
                answer.probs[sent] = teacher_probs
            self.metrics.items(self.cascade, answer.outcome[sent])
            _resolve(jobs, answer, starts, waits, waiting & ~shed)

        feeds = version.teacher_feeds(batch.take(sent))
        self.teacher.call(feeds, sent.size, ticket, done, headers)

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
