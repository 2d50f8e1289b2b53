"""One loaded version of a cascade's student: its bundle, preprocessing, ONNX session, threshold
store (with that version's calibration) and policy. A cascade serves one version at a time and
swaps to another without dropping requests (cascade.py); each request runs end to end on the
version it started with."""

from __future__ import annotations

import logging

import numpy as np

from ..bundle import TEXT_INPUTS, Bundle, TeacherRef, TextPreprocess, TierRef
from ..config.cascade import CascadeConfig
from ..errors import InvalidInput
from ..preprocess import Batch, ImagePreprocessor, Preprocessor, TextPreprocessor
from .control import ThresholdStore
from .stores import ControlStore
from .student import OnnxStudent, Student
from .tiers import LocalTier, TierChain

log = logging.getLogger(__name__)


class StudentVersion:
    def __init__(
        self,
        bundle: Bundle,
        config: CascadeConfig,
        store: ControlStore,
        student: Student | None = None,
    ) -> None:
        m = bundle.manifest
        limits = config.decode
        self.bundle = bundle
        self.manifest = m
        self.version = m.version
        self.preprocessor: Preprocessor
        if isinstance(m.preprocess, TextPreprocess):
            self.preprocessor = TextPreprocessor(
                m.preprocess,
                bundle.path / m.preprocess.tokenizer_file,
                limits.max_text_chars,
                inline_chars=limits.decode_inline_chars,
            )
        else:
            self.preprocessor = ImagePreprocessor(
                m.preprocess,
                limits.max_image_pixels,
                limits.max_request_pixels,
                max_jpeg_scans=limits.max_jpeg_scans,
                inline_pixels=limits.decode_inline_pixels,
                inline_bytes=limits.decode_inline_bytes,
            )
        self.student: Student = student or OnnxStudent(
            bundle.student_path,
            m.student_output,
            device=config.student.device,
            threads=config.student.threads,
        )
        local = [ref for ref in m.tiers if ref.runtime == "onnx"]
        # Tiers in the gateway run in the batch (microseconds), tiers on Triton after them in
        # the background: a local tier after a remote one would run on the event loop.
        if tuple(m.tiers[: len(local)]) != tuple(local):
            raise ValueError(
                f"bundle {bundle.path}: every onnx tier must come before the tiers on Triton"
            )
        self.tiers = TierChain(
            [LocalTier(bundle, ref, config.student, len(m.classes)) for ref in local]
        )
        self.remote: tuple[TierRef, ...] = tuple(m.tiers[len(local) :])
        self.stage_names = bundle.stage_names
        self.thresholds = ThresholdStore(
            store,
            m.name,
            default_threshold=m.default_threshold,
            calibration=m.calibration,
            student_version=m.version,
            frontier=m.frontier,
            tiers=len(m.tiers),
        )
        teacher_version = m.teacher.model_version or "latest"
        self.versions = {
            "student": m.version,
            "teacher": f"{m.teacher.model_name}/{teacher_version}",
        }
        self.policy = m.policy()
        self.in_flight = 0  # requests that started on this version and are not answered yet
        self.retired = False

    def setup(self) -> None:
        """Loads the session and pays first-call costs (codecs, ORT's first run) before traffic
        does; checks the model against the manifest (its inputs, its output's name and size):
        a bundle whose model and manifest disagree fails here, never on a request."""
        self.student.setup()
        batch = self.preprocessor.prepare([self.preprocessor.sample()])
        logits = self.student.predict(self.feeds(batch))
        if logits.ndim != 2 or logits.shape[0] != 1:
            raise ValueError(
                f"{self.bundle.student_path} answers shape {logits.shape} for one input; "
                "expected (1, outputs)"
            )
        if logits.shape[1] != self.manifest.student_outputs:
            raise ValueError(
                f"{self.bundle.student_path} has {logits.shape[1]} outputs; the manifest says "
                f"{self.manifest.student_outputs}"
            )
        self.tiers.setup(batch.tensors, logits)

    def close(self) -> None:
        self.student.close()
        self.tiers.close()

    def feeds(self, batch: Batch) -> dict[str, np.ndarray]:
        if self.manifest.modality == "image":
            return {self.manifest.student_input: batch.tensors["input"]}
        return batch.tensors

    def teacher_feeds(
        self, tensors: dict[str, np.ndarray], ref: TeacherRef | None = None
    ) -> dict[str, np.ndarray]:
        """Canonical tensors -> the teacher's (or a Triton tier's) inputs by their names."""
        ref = ref or self.manifest.teacher
        if self.manifest.modality == "image":
            return {ref.input_name: tensors["input"]}
        return {name: tensors[key] for name, key in zip(ref.text_inputs, TEXT_INPUTS, strict=True)}

    def threshold(self) -> float:
        value: float = self.thresholds.current().threshold
        return value

    def tier_thresholds(self, held: tuple[float, ...] | None = None) -> tuple[float, ...]:
        """Each tier's threshold: `held` (the controller's, under a cost budget), else the
        policy's when it set every stage's (a target accuracy or cost budget on the
        frontier), else the bundle's calibrated ones."""
        for chosen in (held, self.thresholds.current().tier_thresholds):
            if chosen is not None and len(chosen) == len(self.manifest.tiers):
                return chosen
        return self._tier_defaults

    @property
    def costs(self) -> tuple[float, ...]:
        """Per item at each stage, the teacher last (the calibration's units: teacher = 1)."""
        c = self.manifest.calibration
        return (c.cost_student, *(t.cost for t in self.manifest.tiers), c.cost_teacher)

    @property
    def _tier_defaults(self) -> tuple[float, ...]:
        return tuple(t.threshold for t in self.manifest.tiers)

    def check_replaces(self, current: StudentVersion) -> None:
        """A new version must be the same cascade: same name, modality, classes and teacher."""
        new, old = self.manifest, current.manifest
        for field, a, b in (
            ("name", new.name, old.name),
            ("modality", new.modality, old.modality),
            ("classes", new.classes, old.classes),
            ("teacher", new.teacher, old.teacher),
        ):
            if a != b:
                raise InvalidInput(
                    f"bundle {self.bundle.path} cannot replace cascade {old.name!r}: its {field} "
                    "differs"
                )
