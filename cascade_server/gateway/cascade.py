"""One cascade, for one bundle: preprocess -> (micro-batched) student -> policy -> teacher.

The request's own task preprocesses its inputs (so bad input is refused before any model runs,
and one bad request never fails a batch it would have joined), then submits them to the
cascade's micro-batcher. One batch = one student call and at most one teacher call for the
delegated items of every request in it. Answers come back per request, in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import Bundle, Manifest
from ..errors import InvalidInput, TeacherUnavailable
from ..policy import NonFiniteLogits, class_probabilities, decide, softmax
from ..preprocess import Batch, Preprocessor
from ..settings import Settings
from .batcher import Job, MicroBatcher
from .breaker import CircuitBreaker, State
from .control import ThresholdStore
from .metrics import Metrics
from .rollout import RolloutState, RolloutStore
from .stores import FileBackend, StateBackend
from .student import Student
from .teacher import Teacher
from .version import StudentVersion

log = logging.getLogger(__name__)


class BurstLog:
    """Logs the first failure of a burst, then at most one summary per `every_s`."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._last = -float("inf")
        self._suppressed = 0

    def __call__(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            extra = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
            log.warning(msg + extra, *args)
            self._last, self._suppressed = now, 0
        else:
            self._suppressed += 1


@dataclass
class Answer:
    """What the model stages decided for one request's items, in request order."""

    probs: np.ndarray  # (n, classes): the teacher's where it answered, else the student's
    margins: np.ndarray  # (n,) the student's margins
    delegated: np.ndarray  # (n,) bool
    by_teacher: np.ndarray  # (n,) bool
    degraded: np.ndarray  # (n,) bool
    threshold: float
    student_s: float  # the student call that served this request's batch
    teacher_s: float  # the teacher call, 0 when nothing of this request was delegated


BatchJob = Job[tuple["StudentVersion", Batch], "Answer"]


@dataclass
class Predictions:
    """A request's answer plus what the response needs: classes, versions, truncation."""

    cascade: Cascade
    version: StudentVersion
    answer: Answer
    truncated: list[bool] | None
    preprocess_s: float

    def __len__(self) -> int:
        return len(self.answer.margins)

    def outputs(self, top_k: int, total_s: float) -> list[dict[str, Any]]:
        """One `Prediction` (see schemas.py) per input."""
        a, classes = self.answer, self.cascade.classes
        k = min(top_k, len(classes))
        order = np.argsort(-a.probs, axis=1, kind="stable")[:, :k]
        timings = {
            "preprocess": round(self.preprocess_s * 1e3, 3),
            "student": round(a.student_s * 1e3, 3),
            "teacher": round(a.teacher_s * 1e3, 3),
            "total": round(total_s * 1e3, 3),
        }
        probs, margins = a.probs.tolist(), a.margins.tolist()
        out = []
        for i, row in enumerate(order.tolist()):
            top = [{"label": classes[c], "class_id": c, "probability": probs[i][c]} for c in row]
            item = {
                "label": top[0]["label"],
                "class_id": top[0]["class_id"],
                "top_k": top,
                "margin": margins[i],
                "threshold": a.threshold,
                "delegated": bool(a.delegated[i]),
                "answered_by": "teacher" if a.by_teacher[i] else "student",
                "degraded": bool(a.degraded[i]),
                "cascade": self.cascade.name,
                "versions": self.version.versions,
                "timings_ms": timings,
            }
            if self.truncated is not None:
                item["truncated"] = self.truncated[i]
            out.append(item)
        return out


class Cascade:
    """The orchestrator of one cascade. The student-specific parts live in the active
    `StudentVersion`, which an admin call (or another worker's, through the state directory)
    can replace without dropping requests."""

    def __init__(
        self,
        bundle: Bundle,
        settings: Settings,
        metrics: Metrics,
        teacher: Teacher,
        student: Student | None = None,
        store: StateBackend | None = None,
    ) -> None:
        m = bundle.manifest
        self.settings = settings
        self.store = store or FileBackend(settings.state_dir)
        self.name = m.name
        self.modality = m.modality
        self.classes = m.classes
        self.metrics = metrics
        self.teacher = teacher
        self.active = StudentVersion(bundle, settings, self.store, student)
        self.rollout = RolloutStore(self.store, m.name)
        self._swap_lock = asyncio.Lock()
        self.batcher: MicroBatcher[tuple[StudentVersion, Batch], Answer] = MicroBatcher(
            self._run_batch, settings.batching, name=f"{m.name}-batcher"
        )
        self._teacher_failures = BurstLog()
        self._teacher_calls: set[asyncio.Task[None]] = set()
        self.decode_inline_bytes = settings.decode_inline_bytes
        self._decoder = ThreadPoolExecutor(
            settings.decode_threads, thread_name_prefix=f"{m.name}-decode"
        )
        self.max_teacher_calls = settings.teacher_max_in_flight
        self.readiness_interval_s = settings.readiness_interval_s
        self.teacher_ready = False
        self._shown_threshold: tuple[float, str] | None = None
        self._watch: asyncio.Task[None] | None = None
        self.breaker = CircuitBreaker(
            settings.teacher_breaker,
            name=f"cascade {m.name}: teacher {self.versions['teacher']}",
            on_change=self._circuit_changed,
        )

    # The active version's parts, as the routes and admin see them.
    @property
    def bundle(self) -> Bundle:
        return self.active.bundle

    @property
    def manifest(self) -> Manifest:
        return self.active.manifest

    @property
    def versions(self) -> dict[str, str]:
        return self.active.versions

    @property
    def thresholds(self) -> ThresholdStore:
        return self.active.thresholds

    @property
    def student(self) -> Student:
        return self.active.student

    @property
    def preprocessor(self) -> Preprocessor:
        return self.active.preprocessor

    def _circuit_changed(self, old: State, new: State) -> None:
        self.metrics.circuit(self.name, int(new), new.name.lower())

    async def setup(self) -> None:
        self.active.setup()
        await self.teacher.setup()
        self.metrics.prime(self.name)
        self.metrics.student_version(self.name, None, self.active.version)
        self.threshold()
        self.batcher.start()
        # A version rolled out earlier (through any worker) survives restarts.
        await self._follow_rollout()
        # Opens the gRPC channel now rather than on the first delegated request; a teacher
        # that is down is not fatal here (/readyz reports it, requests degrade).
        self.teacher_ready = await self.teacher.ready()
        if not self.teacher_ready:
            log.warning(
                "cascade %s: teacher %s is not ready yet", self.name, self.versions["teacher"]
            )
        self._watch = asyncio.get_running_loop().create_task(
            self._watch_loop(), name=f"{self.name}-watch"
        )

    async def _watch_loop(self) -> None:
        """In the background: teacher readiness (with the client's own timeout, so probes read
        a cached answer and never wait on the network), and student versions rolled out
        through another worker."""
        while True:
            await asyncio.sleep(self.readiness_interval_s)
            try:
                await self._follow_rollout()
            except Exception:  # a bad bundle on disk must not stop the watch
                log.exception("cascade %s: following the rollout failed", self.name)
            ready = await self.teacher.ready()
            if ready != self.teacher_ready:
                log.warning(
                    "cascade %s: teacher %s is %s",
                    self.name,
                    self.versions["teacher"],
                    "ready" if ready else "not ready",
                )
            self.teacher_ready = ready

    async def _follow_rollout(self) -> None:
        state = self.rollout.read()
        if state is not None and Path(state.bundle) != self.active.bundle.path:
            log.warning("cascade %s: following rollout to %s", self.name, state.bundle)
            await self._swap_to(Path(state.bundle))

    async def swap(self, path: Path, actor: str) -> RolloutState:
        """Loads the bundle at `path` beside the active version, warms it, flips to it, and
        records the choice for every worker (and restarts). The old version is retired when
        its in-flight requests are answered."""
        async with self._swap_lock:
            previous = self.active.bundle.path
            await self._swap_to(path)
            new = self.active.bundle.path
            return self.rollout.write(new, previous, self.active.version, actor)

    async def rollback(self, actor: str) -> RolloutState:
        """Back to the version before the last swap."""
        state = self.rollout.read()
        if state is None or state.previous is None:
            raise InvalidInput(f"cascade {self.name!r} has no previous student version")
        return await self.swap(Path(state.previous), actor)

    async def _swap_to(self, path: Path) -> None:
        def load() -> StudentVersion:
            version = StudentVersion(Bundle.load(path.resolve()), self.settings, self.store)
            version.check_replaces(self.active)
            version.setup()
            return version

        try:
            new = await asyncio.to_thread(load)  # session creation and warm-up off the loop
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"bundle {path} cannot be loaded: {exc}") from None
        old, self.active = self.active, new  # the flip: one assignment, between two requests
        self.metrics.student_version(self.name, old.version, new.version)
        self.threshold()
        log.warning("cascade %s: student %s -> %s", self.name, old.version, new.version)
        old.retired = True
        if old.in_flight == 0:
            old.close()

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        await self.batcher.close()
        for task in list(self._teacher_calls):
            task.cancel()
        await asyncio.gather(*self._teacher_calls, return_exceptions=True)
        await self.teacher.close()
        self.active.close()
        self._decoder.shutdown(wait=False, cancel_futures=True)

    def readiness(self) -> dict[str, bool]:
        """Cached: never waits on the network (see _watch_loop)."""
        return {"student": self.active.student.ready, "teacher": self.teacher_ready}

    def threshold(self) -> float:
        value = self.active.threshold()
        self.metrics.set_threshold(self.name, value)
        if (value, self.active.version) != self._shown_threshold:
            self._shown_threshold = (value, self.active.version)
            rate = self.active.manifest.calibration.rate_for_threshold(value)
            self.metrics.set_expected_delegation(self.name, rate)
        return value

    async def predict(self, items: list[Any]) -> Predictions:
        """Answers every input, in order, on the version active when the request started. Bad
        input raises before any model runs."""
        version = self.active
        version.in_flight += 1
        try:
            t0 = time.perf_counter()
            if self._heavy(items):
                loop = asyncio.get_running_loop()
                batch = await loop.run_in_executor(
                    self._decoder, version.preprocessor.prepare, items
                )
            else:
                batch = version.preprocessor.prepare(items)
            preprocess_s = time.perf_counter() - t0
            answer = await self.batcher.submit((version, batch), len(batch))
            return Predictions(self, version, answer, batch.truncated, preprocess_s)
        finally:
            version.in_flight -= 1
            if version.retired and version.in_flight == 0:
                version.close()

    def _heavy(self, items: list[Any]) -> bool:
        size = 0
        for item in items:
            size += len(item)
            if size > self.decode_inline_bytes:
                return True
        return False

    def _run_batch(self, jobs: list[BatchJob]) -> None:
        """Jobs by student version (one group, except around a swap), then `_run_group`."""
        first = jobs[0].payload[0]
        if all(job.payload[0] is first for job in jobs):
            self._run_group(first, jobs)
            return
        groups: dict[int, list[BatchJob]] = {}
        for job in jobs:
            groups.setdefault(id(job.payload[0]), []).append(job)
        for group in groups.values():
            self._run_group(group[0].payload[0], group)

    def _run_group(self, version: StudentVersion, jobs: list[BatchJob]) -> None:
        """One student call for every job; the delegated items of all of them go to the teacher
        in one call, in the background, while the collector moves on to the next batch."""
        batch = Batch.concat([job.payload[1] for job in jobs])
        t0 = time.perf_counter()
        logits = version.student.predict(version.feeds(batch))
        student_s = time.perf_counter() - t0
        threshold = version.threshold()
        if version is self.active:
            self.metrics.set_threshold(self.name, threshold)
        decision = decide(logits, threshold, **version.policy)
        m = version.manifest
        probs = class_probabilities(decision.probs, m.output_classes, len(self.classes))
        if probs is decision.probs:
            probs = probs.copy()  # teacher rows are written into it
        n = len(batch)
        answer = Answer(
            probs=probs,
            margins=decision.margins,
            delegated=decision.delegate,
            by_teacher=np.zeros(n, dtype=bool),
            degraded=np.zeros(n, dtype=bool),
            threshold=threshold,
            student_s=student_s,
            teacher_s=0.0,
        )
        self.metrics.student_batch(self.name, decision.margins, student_s)
        delegated = np.flatnonzero(decision.delegate)
        self.metrics.outcomes(self.name, n - delegated.size, 0, 0)
        if not delegated.size:
            _resolve(jobs, answer, lambda _: True)
            return
        skipped = self._skip_teacher()
        if skipped is not None:
            answer.degraded[delegated] = True
            self.metrics.teacher_skipped(self.name, skipped)
            self.metrics.outcomes(self.name, 0, 0, delegated.size)
            _resolve(jobs, answer, lambda _: True)
            return
        # Requests with nothing delegated answer now; the rest when the teacher has answered.
        starts = np.cumsum([0] + [job.size for job in jobs])
        waiting = np.zeros(len(jobs), dtype=bool)
        waiting[np.searchsorted(starts, delegated, side="right") - 1] = True
        _resolve(jobs, answer, lambda j: not waiting[j])
        feeds = version.teacher_feeds(batch.take(delegated))
        task = asyncio.get_running_loop().create_task(
            self._delegate(jobs, answer, feeds, delegated, waiting)
        )
        self._teacher_calls.add(task)
        task.add_done_callback(self._teacher_calls.discard)

    def _skip_teacher(self) -> str | None:
        """Why no teacher call is made for this batch (its delegated items answer degraded at
        once), or None: the call goes ahead."""
        if len(self._teacher_calls) >= self.max_teacher_calls:
            return "overloaded"
        if not self.breaker.allow():
            return "circuit_open"
        return None

    async def _delegate(
        self,
        jobs: list[BatchJob],
        answer: Answer,
        feeds: dict[str, np.ndarray],
        delegated: np.ndarray,
        waiting: np.ndarray,
    ) -> None:
        t0 = time.perf_counter()
        error: str | None = None
        try:
            teacher_logits = await self.teacher.infer(feeds)
            if teacher_logits.shape != (delegated.size, len(self.classes)):
                raise TeacherUnavailable(
                    "error",
                    f"teacher returned logits of shape {teacher_logits.shape}; expected "
                    f"{(delegated.size, len(self.classes))}",
                )
            try:
                answer.probs[delegated] = softmax(teacher_logits)
            except NonFiniteLogits:
                raise TeacherUnavailable("error", "teacher returned non-finite logits") from None
            answer.by_teacher[delegated] = True
            self.breaker.success()
        except TeacherUnavailable as exc:
            error = exc.kind
            self.breaker.failure()
            answer.degraded[delegated] = True
            self._teacher_failures(
                "cascade %s: teacher %s failed (%s); answering with the student",
                self.name,
                self.versions["teacher"],
                exc,
            )
        except BaseException as exc:  # unexpected: those requests answer 500 (or are cancelled)
            if isinstance(exc, Exception):
                self.breaker.failure()
            for j, job in enumerate(jobs):
                if waiting[j] and not job.future.done():
                    job.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            answer.teacher_s = time.perf_counter() - t0
            self.metrics.teacher_call(self.name, delegated.size, answer.teacher_s, error)
        n_teacher = int(answer.by_teacher.sum())
        self.metrics.outcomes(self.name, 0, n_teacher, delegated.size - n_teacher)
        _resolve(jobs, answer, lambda j: bool(waiting[j]))


def _resolve(jobs: list[BatchJob], answer: Answer, which: Callable[[int], bool]) -> None:
    """Hands each chosen job its rows of the batch's answer."""
    start = 0
    for j, job in enumerate(jobs):
        end = start + job.size
        if which(j) and not job.future.done():
            rows = slice(start, end)
            job.future.set_result(
                Answer(
                    probs=answer.probs[rows],
                    margins=answer.margins[rows],
                    delegated=answer.delegated[rows],
                    by_teacher=answer.by_teacher[rows],
                    degraded=answer.degraded[rows],
                    threshold=answer.threshold,
                    student_s=answer.student_s,
                    teacher_s=answer.teacher_s,
                )
            )
        start = end
