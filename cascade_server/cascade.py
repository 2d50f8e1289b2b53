"""One cascade: preprocess -> student -> policy -> (teacher) -> answer, for one bundle."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from .bundle import TEXT_INPUTS, Bundle, TextPreprocess
from .control import ThresholdStore
from .errors import TeacherUnavailable
from .metrics import Metrics
from .policy import NonFiniteLogits, class_probabilities, decide, softmax
from .preprocess import Batch, ImagePreprocessor, TextPreprocessor
from .settings import Settings
from .student import OnnxStudent
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
class Timings:
    preprocess: float = 0.0
    student: float = 0.0
    teacher: float = 0.0

    def as_ms(self, total: float) -> dict[str, float]:
        return {
            "preprocess": round(self.preprocess * 1e3, 3),
            "student": round(self.student * 1e3, 3),
            "teacher": round(self.teacher * 1e3, 3),
            "total": round(total * 1e3, 3),
        }


class Cascade:
    def __init__(self, bundle: Bundle, settings: Settings, metrics: Metrics, teacher: Teacher):
        m = bundle.manifest
        self.bundle = bundle
        self.manifest = m
        self.name = m.name
        self.modality = m.modality
        self.classes = m.classes
        self.metrics = metrics
        self.teacher = teacher
        if isinstance(m.preprocess, TextPreprocess):
            self.preprocessor = TextPreprocessor(
                m.preprocess, bundle.path / m.preprocess.tokenizer_file, settings.max_text_chars
            )
        else:
            self.preprocessor = ImagePreprocessor(m.preprocess, settings.max_image_pixels)
        self.student = OnnxStudent(
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
        self._teacher_failures = BurstLog()
        self._policy = m.policy()

    async def setup(self) -> None:
        self.student.setup()
        await self.teacher.setup()
        self.metrics.prime(self.name)
        self.threshold()
        self._warm_up()
        # Opens the gRPC channel now rather than on the first delegated request; a teacher
        # that is down is not fatal here (/readyz reports it, requests degrade).
        if not await self.teacher.ready():
            log.warning(
                "cascade %s: teacher %s is not ready yet", self.name, self.versions["teacher"]
            )

    def _warm_up(self) -> None:
        """Pay first-call costs (Pillow's codec imports, ORT's first run) before traffic does."""
        if self.modality == "text":
            sample: bytes | str = "warm up"
        else:
            import io

            from PIL import Image

            spec = self.manifest.preprocess
            buf = io.BytesIO()
            Image.new("L", (spec.width, spec.height)).save(buf, "PNG")
            sample = buf.getvalue()
        logits = self.student.predict(self._student_feeds(self.preprocessor.prepare([sample])))
        if logits.shape[1] != self.manifest.student_outputs:
            raise ValueError(
                f"{self.bundle.student_path} has {logits.shape[1]} outputs; the manifest says "
                f"{self.manifest.student_outputs}"
            )

    async def close(self) -> None:
        await self.teacher.close()
        self.student.close()

    async def readiness(self) -> dict[str, bool]:
        return {"student": self.student.ready, "teacher": await self.teacher.ready()}

    def threshold(self) -> float:
        value = self.thresholds.current().threshold
        self.metrics.threshold.labels(self.name).set(value)
        return value

    def _student_feeds(self, batch: Batch, idx=None) -> dict[str, np.ndarray]:
        tensors = batch.tensors if idx is None else batch.take(idx)
        if self.modality == "image":
            return {self.manifest.student_input: tensors["input"]}
        return tensors

    def _teacher_feeds(self, batch: Batch, idx) -> dict[str, np.ndarray]:
        tensors = batch.take(idx)
        ref = self.manifest.teacher
        if self.modality == "image":
            return {ref.input_name: tensors["input"]}
        return {name: tensors[key] for name, key in zip(ref.text_inputs, TEXT_INPUTS, strict=True)}

    async def predict(self, items: list, top_k: int) -> tuple[list[dict], Timings]:
        """Answers every input, in order. Bad input raises before any model runs."""
        t = Timings()
        t0 = time.perf_counter()
        batch = self.preprocessor.prepare(items)
        t1 = time.perf_counter()
        logits = self.student.predict(self._student_feeds(batch))
        t2 = time.perf_counter()
        t.preprocess, t.student = t1 - t0, t2 - t1

        threshold = self.threshold()
        decision = decide(logits, threshold, **self._policy)
        probs = class_probabilities(decision.probs, self.manifest.output_classes, len(self.classes))
        probs = probs.copy()
        n = len(items)
        answered_by = np.full(n, "student", dtype=object)
        degraded = np.zeros(n, dtype=bool)
        delegated = np.flatnonzero(decision.delegate)
        if delegated.size:
            t3 = time.perf_counter()
            try:
                teacher_logits = await self.teacher.infer(self._teacher_feeds(batch, delegated))
                try:
                    probs[delegated] = softmax(teacher_logits)
                except NonFiniteLogits:
                    raise TeacherUnavailable(
                        "error", "teacher returned non-finite logits"
                    ) from None
                answered_by[delegated] = "teacher"
            except TeacherUnavailable as exc:
                degraded[delegated] = True
                self._safe(self.metrics.teacher_errors.labels(self.name, exc.kind).inc)
                self._teacher_failures(
                    "cascade %s: teacher %s failed (%s); answering with the student",
                    self.name,
                    self.versions["teacher"],
                    exc,
                )
            t.teacher = time.perf_counter() - t3

        k = min(top_k, len(self.classes))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        outputs = []
        for i in range(n):
            top = [
                {"label": self.classes[c], "class_id": int(c), "probability": float(probs[i, c])}
                for c in order[i]
            ]
            outputs.append(
                {
                    "label": top[0]["label"],
                    "class_id": top[0]["class_id"],
                    "top_k": top,
                    "margin": float(decision.margins[i]),
                    "threshold": threshold,
                    "delegated": bool(decision.delegate[i]),
                    "answered_by": str(answered_by[i]),
                    "degraded": bool(degraded[i]),
                    "cascade": self.name,
                    "versions": self.versions,
                    **({"truncated": batch.truncated[i]} if batch.truncated is not None else {}),
                }
            )
        self._safe(self._record, decision, answered_by, degraded, delegated.size, n, t)
        return outputs, t

    def record_total(self, t: Timings, total: float) -> None:
        def observe() -> None:
            lat = self.metrics.latency
            lat.labels(self.name, "total").observe(total)
            lat.labels(self.name, "overhead").observe(
                max(total - t.preprocess - t.student - t.teacher, 0.0)
            )

        self._safe(observe)

    def _record(
        self, decision, answered_by, degraded, n_delegated: int, n: int, t: Timings
    ) -> None:
        m = self.metrics
        n_degraded = int(degraded.sum())
        n_teacher = int((answered_by == "teacher").sum())
        for outcome, count in (
            ("student", n - n_teacher - n_degraded),
            ("teacher", n_teacher),
            ("degraded", n_degraded),
        ):
            if count:
                m.requests.labels(self.name, outcome).inc(count)
        margin = m.margin.labels(self.name)
        for value in decision.margins:
            margin.observe(float(value))
        m.latency.labels(self.name, "preprocess").observe(t.preprocess)
        m.latency.labels(self.name, "student").observe(t.student)
        m.batch_size.labels(self.name, "student").observe(n)
        if n_delegated:
            m.latency.labels(self.name, "teacher").observe(t.teacher)
            m.batch_size.labels(self.name, "teacher").observe(n_delegated)

    @staticmethod
    def _safe(fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # metrics must never fail a request
            log.exception("recording metrics failed")
