"""The demo cascades, built through the same stages as every experiment, seconds on a CPU,
no download; `cascade-serve --demo` builds them when they are missing:
- digits (`configs/digits/kd.yaml`): a CNN teacher and a tiny MLP student (KD) on
  scikit-learn's bundled 8x8 digits;
- intents (`configs/intents/kd.yaml`): a small Transformer teacher and a fastText-style
  student (KD) on a banking-intent corpus generated in code (cascade_server/train/corpus.py).
"""

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
TEXT_DEMO_NAME = "intents"
TEXT_DEMO_TEACHER = "intents_teacher"
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


TEXT_DEMO_CONFIG = ExperimentConfig.model_validate(
    {
        "name": "intents-kd",
        "seed": 0,
        "data": {"name": "intents", "params": {"n": 2400, "seed": 0}},
        "text": {"vocab_size": 2000, "max_length": 24, "model": "wordpiece", "lowercase": True},
        "teacher": {
            "arch": "transformer",
            "params": {"dim": 48, "heads": 4, "layers": 2, "ff": 96},
            "epochs": 20,
            "lr": 2e-3,
        },
        # Tiny on purpose: a 4-dimensional bag of tokens (no bigrams), blind to word order.
        "student": {"arch": "bag", "params": {"dim": 4, "buckets": 0}},
        "method": {"name": "kd", "params": {"a": 0.0, "b": 1.0, "temperature": 4.0}},
        "fit": {"epochs": 30, "lr": 1e-2},
        "calibration": {"target_delegation_rate": 0.2},
        "export": {"name": TEXT_DEMO_NAME, "teacher_name": TEXT_DEMO_TEACHER},
    }
)
DEMOS = {
    DEMO_NAME: (DEMO_CONFIG, DEMO_TEACHER),
    TEXT_DEMO_NAME: (TEXT_DEMO_CONFIG, TEXT_DEMO_TEACHER),
}


def demo_paths(repository: Path, bundles: Path, name: str = DEMO_NAME) -> tuple[Path, Path]:
    return repository / DEMOS[name][1], bundles / name


def demo_exists(repository: Path, bundles: Path, name: str = DEMO_NAME) -> bool:
    teacher, bundle = demo_paths(repository, bundles, name)
    return (teacher / "1" / "model.onnx").is_file() and (bundle / "manifest.json").is_file()


def build_demo(
    repository: Path,
    bundles: Path,
    *,
    progress: bool = True,
    force: bool = False,
    run_dir: Path | None = None,
    name: str = DEMO_NAME,
) -> Bundle:
    """One demo cascade (`digits` or `intents`), reused when it exists."""
    from .stages import run_all

    config = DEMOS[name][0]
    teacher_dir, bundle_dir = demo_paths(repository, bundles, name)
    if not force and demo_exists(repository, bundles, name):
        log.info("demo cascade exists in %s and %s; reusing it", teacher_dir, bundle_dir)
        return Bundle.load(bundle_dir)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = run_dir or Path(tmp)
        evaluation = run_all(config, run, progress=progress, bundles=bundles, repository=repository)
    summary = evaluation["summary"]
    bundle = Bundle.load(bundle_dir)
    log.info(
        "demo %s built in %.1fs: test accuracy teacher %.3f, student %.3f, cascade %.3f at 20%% "
        "delegation",
        name,
        time.perf_counter() - started,
        summary["teacher_accuracy"],
        summary["student_accuracy"],
        summary["cascade_accuracy"]["0.2"],
    )
    return bundle


def build_demos(repository: Path, bundles: Path, **kwargs) -> list[Bundle]:
    """Both demo cascades."""
    return [build_demo(repository, bundles, name=name, **kwargs) for name in DEMOS]
