"""One short `run` for every method on CPU with the augmentation recipe on: every method trains
through the same engine with crops, flips, SGD + cosine + warm-up, and label smoothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cascade_server.train.config import load_config
from cascade_server.train.methods import METHODS
from cascade_server.train.stages import run_all

ROOT = Path(__file__).resolve().parents[2]
RECIPE = [
    "teacher.epochs=2",
    "teacher.optimizer=sgd",
    "teacher.lr=0.05",
    "teacher.schedule=cosine",
    "teacher.warmup_epochs=1",
    "teacher.crop_padding=1",
    "teacher.label_smoothing=0.1",
    "fit.epochs=2",
    "fit.crop_padding=1",
    "fit.hflip=true",
]


@pytest.mark.parametrize("method", sorted(METHODS.names()))
def test_every_method_runs_with_augmentation(method, tmp_path):
    config = load_config(ROOT / "configs" / "digits" / f"{method}.yaml", RECIPE)
    assert config.fit.crop_padding == 1 and config.teacher.optimizer == "sgd"
    result = run_all(config, tmp_path / method, progress=False)
    summary = result["summary"]
    assert 0.0 <= summary["student_accuracy"] <= 1.0
    assert summary["teacher_accuracy"] > 0.3  # 2 epochs of SGD on digits
    record = json.loads((tmp_path / method / "record.json").read_text())
    assert np.isfinite(record["student"]["loss_history"]).all()
