"""The demo cascade: a CNN teacher and a tiny MLP student distilled from it (KD) on
scikit-learn's bundled 8x8 digits. Seconds on a CPU, no download. It is the experiment
`configs/digits/kd.yaml` run through the same pipeline as every other; `cascade-serve --demo`
builds it when it is missing."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from ..bundle import Bundle
from .config import ExperimentConfig

log = logging.getLogger(__name__)

DEMO_NAME = "digits"
DEMO_TEACHER = "digits_teacher"
DEMO_CONFIG = ExperimentConfig.model_validate(
    {
        "name": "digits-kd",
        "seed": 0,
        "data": {"name": "digits"},
        # Fixed normalisation (not measured): keeps the demo's manifest simple to read.
        "preprocess": {"mean": [0.5], "std": [0.5]},
        "teacher": {"arch": "cnn", "params": {"width": 32}, "epochs": 40, "lr": 3e-3},
        # Deliberately tiny, so that the cascade has something to do.
        "student": {"arch": "mlp", "params": {"hidden": [6]}},
        "method": {"name": "kd", "params": {"a": 0.0, "b": 1.0, "temperature": 4.0}},
        "fit": {"epochs": 60, "lr": 1e-2},
        "calibration": {"target_delegation_rate": 0.2},
        "export": {"name": DEMO_NAME, "teacher_name": DEMO_TEACHER},
    }
)


def demo_paths(repository: Path, bundles: Path) -> tuple[Path, Path]:
    return repository / DEMO_TEACHER, bundles / DEMO_NAME


def demo_exists(repository: Path, bundles: Path) -> bool:
    teacher, bundle = demo_paths(repository, bundles)
    return (teacher / "1" / "model.onnx").is_file() and (bundle / "manifest.json").is_file()


def build_demo(
    repository: Path,
    bundles: Path,
    *,
    progress: bool = True,
    force: bool = False,
    run_dir: Path | None = None,
) -> Bundle:
    from .pipeline import export, prepare, run_all

    teacher_dir, bundle_dir = demo_paths(repository, bundles)
    if not force and demo_exists(repository, bundles):
        log.info("demo cascade exists in %s and %s; reusing it", teacher_dir, bundle_dir)
        return Bundle.load(bundle_dir)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = run_dir or Path(tmp)
        summary = run_all(DEMO_CONFIG, run, progress=progress)["summary"]
        bundle = export(prepare(DEMO_CONFIG), run, bundles=bundles, repository=repository)
    log.info(
        "demo built in %.1fs: test accuracy teacher %.3f, student %.3f, cascade %.3f at 20%% "
        "delegation",
        time.perf_counter() - started,
        summary["teacher_accuracy"],
        summary["student_accuracy"],
        summary["cascade_accuracy"]["0.2"],
    )
    return bundle
