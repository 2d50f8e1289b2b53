"""The demo cascade: a teacher and a distilled student on scikit-learn's bundled 8x8 digits.
Seconds on a CPU, no download. `cascade-serve --demo` builds it when it is missing."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..bundle import Bundle, ImagePreprocess, Manifest, TeacherRef
from ..preprocess import normalize
from .calibrate import calibrate
from .data import DATASETS, split
from .engine import FitConfig, accuracy, fit, predict_logits, seed_everything
from .export import save_weights, write_bundle, write_teacher_entry
from .losses import LOSSES
from .models import build, count_macs, count_parameters

log = logging.getLogger(__name__)

DEMO_NAME = "digits"
DEMO_TEACHER = "digits_teacher"


@dataclass(frozen=True)
class DemoConfig:
    seed: int = 0
    teacher_arch: str = "cnn"
    teacher_kwargs: tuple = (("width", 32),)
    teacher_epochs: int = 40
    student_arch: str = "mlp"
    # Deliberately tiny, so that the cascade has something to do.
    student_kwargs: tuple = (("hidden", (6,)),)
    student_epochs: int = 60
    temperature: float = 4.0
    target_delegation_rate: float = 0.2
    progress: bool = True


def demo_paths(repository: Path, bundles: Path) -> tuple[Path, Path]:
    return repository / DEMO_TEACHER, bundles / DEMO_NAME


def demo_exists(repository: Path, bundles: Path) -> bool:
    teacher, bundle = demo_paths(repository, bundles)
    return (teacher / "1" / "model.onnx").is_file() and (bundle / "manifest.json").is_file()


def build_demo(
    repository: Path, bundles: Path, config: DemoConfig = DemoConfig(), *, force: bool = False
) -> Bundle:
    teacher_dir, bundle_dir = demo_paths(repository, bundles)
    if not force and demo_exists(repository, bundles):
        log.info("demo cascade exists in %s and %s; reusing it", teacher_dir, bundle_dir)
        return Bundle.load(bundle_dir)
    started = time.perf_counter()
    seed_everything(config.seed)
    data = DATASETS.get("digits")()
    splits = split(data, seed=config.seed)
    spec = ImagePreprocess(height=8, width=8, channels=1, mean=(0.5,), std=(0.5,))
    in_shape = (spec.channels, spec.height, spec.width)
    xs = {name: normalize(getattr(splits, name).x, spec) for name in ("train", "val", "test")}
    n_classes = len(data.classes)

    teacher = build(config.teacher_arch, in_shape, n_classes, **dict(config.teacher_kwargs))
    fit(
        teacher,
        LOSSES.get("ce")(),
        xs["train"],
        splits.train.y,
        FitConfig(epochs=config.teacher_epochs, seed=config.seed, progress=config.progress),
        desc="teacher",
    )
    t_logits = {k: predict_logits(teacher, v) for k, v in xs.items()}

    student = build(config.student_arch, in_shape, n_classes, **dict(config.student_kwargs))
    loss = LOSSES.get("kd")(a=0.0, b=1.0, temperature=config.temperature)
    fit(
        student,
        loss,
        xs["train"],
        splits.train.y,
        FitConfig(
            epochs=config.student_epochs, lr=1e-2, seed=config.seed, progress=config.progress
        ),
        teacher_logits=t_logits["train"],
        desc="student (kd)",
    )
    s_logits = {k: predict_logits(student, v) for k, v in xs.items()}

    teacher_macs, student_macs = count_macs(teacher, in_shape), count_macs(student, in_shape)
    calibration = calibrate(
        s_logits["val"],
        t_logits["val"],
        splits.val.y,
        target_delegation_rate=config.target_delegation_rate,
        cost_student=student_macs / teacher_macs,
        split="val",
    )
    test_margins_below = _rate_at(s_logits["test"], calibration.threshold)
    write_teacher_entry(repository, DEMO_TEACHER, teacher, in_shape, n_classes)
    manifest = Manifest(
        name=DEMO_NAME,
        version=f"{DEMO_NAME}-kd-{data.fingerprint()[:8]}-s{config.seed}",
        modality="image",
        classes=data.classes,
        preprocess=spec,
        default_threshold=calibration.threshold,
        calibration=calibration,
        teacher=TeacherRef(model_name=DEMO_TEACHER, model_version="1"),
        training={
            "method": "kd",
            "params": {"a": 0.0, "b": 1.0, "temperature": config.temperature},
            "dataset": "digits",
            "data_fingerprint": data.fingerprint(),
            "seed": config.seed,
            "student": {
                "arch": config.student_arch,
                **_jsonable(config.student_kwargs),
                "parameters": count_parameters(student),
                "macs": student_macs,
            },
            "teacher": {
                "arch": config.teacher_arch,
                **_jsonable(config.teacher_kwargs),
                "parameters": count_parameters(teacher),
                "macs": teacher_macs,
            },
            "test": {
                "n": len(splits.test),
                "student_accuracy": accuracy(s_logits["test"], splits.test.y),
                "teacher_accuracy": accuracy(t_logits["test"], splits.test.y),
                "delegation_rate_at_default_threshold": test_margins_below,
                "cascade_accuracy_at_default_threshold": _cascade_acc(
                    s_logits["test"], t_logits["test"], splits.test.y, calibration.threshold
                ),
            },
        },
    )
    bundle = write_bundle(bundle_dir, student, manifest)
    # PyTorch weights beside the export (state dicts only: loaded with weights_only=True).
    save_weights(student, bundle_dir / "student.pt")
    save_weights(teacher, teacher_dir / "1" / "teacher.pt")
    log.info(
        "demo built in %.1fs: teacher %.3f, student %.3f, cascade %.3f at %.0f%% delegation (test)",
        time.perf_counter() - started,
        manifest.training["test"]["teacher_accuracy"],
        manifest.training["test"]["student_accuracy"],
        manifest.training["test"]["cascade_accuracy_at_default_threshold"],
        100 * test_margins_below,
    )
    return bundle


def _rate_at(logits: np.ndarray, threshold: float) -> float:
    from ..policy import decide

    return float(decide(logits, threshold).delegate.mean())


def _cascade_acc(s: np.ndarray, t: np.ndarray, y: np.ndarray, threshold: float) -> float:
    from ..policy import decide

    d = decide(s, threshold).delegate
    return float(np.where(d, t.argmax(1) == y, s.argmax(1) == y).mean())


def _jsonable(kwargs: tuple) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs}
