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
from typing import Any

import numpy as np

from ..bundle import TEXT_INPUTS, Bundle, TextPreprocess
from ..errors import TeacherUnavailable
from ..policy import NonFiniteLogits, class_probabilities, decide, softmax
from ..preprocess import Batch, ImagePreprocessor, Preprocessor, TextPreprocessor
from ..settings import Settings
from .batcher import Job, MicroBatcher
from .breaker import CircuitBreaker, State
from .control import ThresholdStore
from .metrics import Metrics
from .student import OnnxStudent, Student
from .teacher import Teacher

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


@dataclass
class Predictions:
    """A request's answer plus what the response needs: classes, versions, truncation."""

    cascade: Cascade
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
                "versions": self.cascade.versions,
                "timings_ms": timings,
            }
            if self.truncated is not None:
                item["truncated"] = self.truncated[i]
            out.append(item)
        return out


class Cascade:
    def __init__(
        self,
        bundle: Bundle,
        settings: Settings,
        metrics: Metrics,
        teacher: Teacher,
        student: Student | None = None,
    ) -> None:
        m = bundle.manifest
        self.bundle = bundle
        self.manifest = m
        self.name = m.name
        self.modality = m.modality
        self.classes = m.classes
        self.metrics = metrics
        self.teacher = teacher
        self.preprocessor: Preprocessor
        if isinstance(m.preprocess, TextPreprocess):
            self.preprocessor = TextPreprocessor(
                m.preprocess, bundle.path / m.preprocess.tokenizer_file, settings.max_text_chars
            )
        else:
            self.preprocessor = ImagePreprocessor(
                m.preprocess, settings.max_image_pixels, settings.max_request_pixels
            )
        self.student: Student = student or OnnxStudent(
            bundle.student_path,
            m.student_output,
            device=settings.student_device,
            threads=settings.student_threads,
        )
        self.thresholds = ThresholdStore(
            settings.state_dir,
            m.name,
            default_threshold=m.default_threshold,
            calibration=m.calibration,
            student_version=m.version,
        )
        teacher_version = m.teacher.model_version or "latest"
        self.versions = {
            "student": m.version,
            "teacher": f"{m.teacher.model_name}/{teacher_version}",
        }
        self.batcher: MicroBatcher[Batch, Answer] = MicroBatcher(
            self._run_batch, settings.batching, name=f"{m.name}-batcher"
        )
        self._teacher_failures = BurstLog()
        self._policy = m.policy()
        self._teacher_calls: set[asyncio.Task[None]] = set()
        self.decode_inline_bytes = settings.decode_inline_bytes
        self._decoder = ThreadPoolExecutor(
            settings.decode_threads, thread_name_prefix=f"{m.name}-decode"
        )
        self.max_teacher_calls = settings.teacher_max_in_flight
        self.readiness_interval_s = settings.readiness_interval_s
        self.teacher_ready = False
        self._watch: asyncio.Task[None] | None = None
        self.breaker = CircuitBreaker(
            settings.teacher_breaker,
            name=f"cascade {m.name}: teacher {self.versions['teacher']}",
            on_change=self._circuit_changed,
        )

    def _circuit_changed(self, old: State, new: State) -> None:
        self.metrics.circuit(self.name, int(new), new.name.lower())

    async def setup(self) -> None:
        self.student.setup()
        await self.teacher.setup()
        self.metrics.prime(self.name)
        self.threshold()
        self._warm_up()
        self.batcher.start()
        # Opens the gRPC channel now rather than on the first delegated request; a teacher
        # that is down is not fatal here (/readyz reports it, requests degrade).
        self.teacher_ready = await self.teacher.ready()
        if not self.teacher_ready:
            log.warning(
                "cascade %s: teacher %s is not ready yet", self.name, self.versions["teacher"]
            )
        self._watch = asyncio.get_running_loop().create_task(
            self._watch_teacher(), name=f"{self.name}-teacher-readiness"
        )

    async def _watch_teacher(self) -> None:
        """Teacher readiness, checked in the background with its own timeout (the client's
        readiness_timeout_s) so that probes read a cached answer and never wait on the network."""
        while True:
            await asyncio.sleep(self.readiness_interval_s)
            ready = await self.teacher.ready()
            if ready != self.teacher_ready:
                log.warning(
                    "cascade %s: teacher %s is %s",
                    self.name,
                    self.versions["teacher"],
                    "ready" if ready else "not ready",
                )
            self.teacher_ready = ready

    def _warm_up(self) -> None:
        """Pay first-call costs (Pillow's codec imports, ORT's first run) before traffic does."""
        batch = self.preprocessor.prepare([self.preprocessor.sample()])
        logits = self.student.predict(self._student_feeds(batch))
        if logits.shape[1] != self.manifest.student_outputs:
            raise ValueError(
                f"{self.bundle.student_path} has {logits.shape[1]} outputs; the manifest says "
                f"{self.manifest.student_outputs}"
            )

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        await self.batcher.close()
        for task in list(self._teacher_calls):
            task.cancel()
        await asyncio.gather(*self._teacher_calls, return_exceptions=True)
        await self.teacher.close()
        self.student.close()
        self._decoder.shutdown(wait=False, cancel_futures=True)

    def readiness(self) -> dict[str, bool]:
        """Cached: never waits on the network (see _watch_teacher)."""
        return {"student": self.student.ready, "teacher": self.teacher_ready}

    def threshold(self) -> float:
        value = self.thresholds.current().threshold
        self.metrics.set_threshold(self.name, value)
        return value

    def _student_feeds(self, batch: Batch) -> dict[str, np.ndarray]:
        if self.modality == "image":
            return {self.manifest.student_input: batch.tensors["input"]}
        return batch.tensors

    def _teacher_feeds(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ref = self.manifest.teacher
        if self.modality == "image":
            return {ref.input_name: tensors["input"]}
        return {name: tensors[key] for name, key in zip(ref.text_inputs, TEXT_INPUTS, strict=True)}

    async def predict(self, items: list[Any]) -> Predictions:
        """Answers every input, in order. Bad input raises before any model runs."""
        t0 = time.perf_counter()
        if self._heavy(items):
            loop = asyncio.get_running_loop()
            batch = await loop.run_in_executor(self._decoder, self.preprocessor.prepare, items)
        else:
            batch = self.preprocessor.prepare(items)
        preprocess_s = time.perf_counter() - t0
        answer = await self.batcher.submit(batch, len(batch))
        return Predictions(self, answer, batch.truncated, preprocess_s)

    def _heavy(self, items: list[Any]) -> bool:
        size = 0
        for item in items:
            size += len(item)
            if size > self.decode_inline_bytes:
                return True
        return False

    def _run_batch(self, jobs: list[Job[Batch, Answer]]) -> None:
        """One student call for every job; the delegated items of all of them go to the teacher
        in one call, in the background, while the collector moves on to the next batch."""
        batch = Batch.concat([job.payload for job in jobs])
        t0 = time.perf_counter()
        logits = self.student.predict(self._student_feeds(batch))
        student_s = time.perf_counter() - t0
        threshold = self.threshold()
        decision = decide(logits, threshold, **self._policy)
        probs = class_probabilities(decision.probs, self.manifest.output_classes, len(self.classes))
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
        task = asyncio.get_running_loop().create_task(
            self._delegate(jobs, answer, batch.take(delegated), delegated, waiting)
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
        jobs: list[Job[Batch, Answer]],
        answer: Answer,
        tensors: dict[str, np.ndarray],
        delegated: np.ndarray,
        waiting: np.ndarray,
    ) -> None:
        t0 = time.perf_counter()
        error: str | None = None
        try:
            teacher_logits = await self.teacher.infer(self._teacher_feeds(tensors))
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


def _resolve(jobs: list[Job[Batch, Answer]], answer: Answer, which: Callable[[int], bool]) -> None:
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
