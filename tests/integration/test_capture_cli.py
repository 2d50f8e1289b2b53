"""`cascade-train distill --capture DIR` as users run it: the demo's run directory, capture
shards made as the gateway makes them (its preprocessing, the served student and teacher), a
few epochs, then `export`: a bundle with a new version that the gateway's loader accepts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cascade_server.bundle import Bundle
from cascade_server.capture import write_shard
from cascade_server.policy import softmax, top2_margin
from cascade_server.preprocess import ImagePreprocessor
from tests.conftest import png_bytes

ROOT = Path(__file__).resolve().parents[2]


def train(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "cascade_server.train.cli", "--no-progress", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def capture_like_the_gateway(demo, directory: Path, idx: np.ndarray, source: int, **meta) -> Path:
    """The demo's images preprocessed by the gateway's code, scored by the served student and
    teacher (ONNX Runtime), written as one shard."""
    import onnxruntime as ort

    bundle = Bundle.load(demo.bundle)
    manifest = bundle.manifest
    tensors = (
        ImagePreprocessor(manifest.preprocess, max_pixels=1 << 20)
        .prepare([png_bytes(img) for img in demo.images[idx]])
        .tensors
    )
    cpu = ["CPUExecutionProvider"]
    student = ort.InferenceSession(str(bundle.student_path), providers=cpu)
    teacher_file = demo.repository / manifest.teacher.model_name / "1" / "model.onnx"
    teacher = ort.InferenceSession(str(teacher_file), providers=cpu)
    s_probs = softmax(student.run(None, tensors)[0]).astype(np.float32)
    t_probs = softmax(teacher.run(None, tensors)[0]).astype(np.float32)
    directory.mkdir(parents=True, exist_ok=True)
    fields = dict(cascade=manifest.name, modality="image", classes=manifest.classes)
    fields.update(student_version=manifest.version, teacher_version="digits_teacher/1")
    fields.update(meta)
    return write_shard(
        directory,
        inputs=tensors,
        teacher_probs=t_probs,
        student_probs=s_probs,
        margins=top2_margin(s_probs).astype(np.float32),
        source=np.full(len(idx), source, np.uint8),
        **fields,
    )


@pytest.fixture(scope="module")
def flywheel(demo, tmp_path_factory):
    """A copy of the demo's run, a capture (120 delegated items, 60 shadow samples), and the
    student distilled with it (what `distill --capture` printed)."""
    root = tmp_path_factory.mktemp("flywheel")
    run = root / "run"
    shutil.copytree(demo.run, run)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(demo.images))[:180]
    capture = root / "capture"
    capture_like_the_gateway(demo, capture / "digits", idx[:120], source=0)
    capture_like_the_gateway(demo, capture / "digits", idx[120:], source=1)
    out = train(
        "distill", run, "--capture", capture, "--capture-holdout", "0.25", "--set", "fit.epochs=3"
    ).stdout
    return root, run, capture, json.loads(out.strip().splitlines()[-1])


def test_distill_with_capture_then_export_makes_a_new_version(demo, flywheel):
    root, run, _, done = flywheel
    live = Bundle.load(demo.bundle).manifest
    val = Bundle.load(demo.bundle).manifest.calibration.n  # the demo calibrated on val alone
    assert done["split"] == "val+capture" and done["n"] == val + 45
    assert done["capture"]["items"] == 180 and done["capture"]["holdout_items"] == 45
    record = json.loads((run / "record.json").read_text())
    fingerprint = record["capture"]["fingerprint"]
    assert record["capture"]["train_items"] == 135
    assert [s["items"] for s in record["capture"]["shards"]] == [120, 60]
    assert record["capture"]["by_source"] == {"delegated": 120, "shadow": 60}

    train("export", run, "--bundles", root / "bundles", "--repository", root / "repo")
    new = Bundle.load(root / "bundles" / "digits").manifest
    assert new.version != live.version and new.version == f"{live.version}-c{fingerprint[:8]}"
    assert new.training["capture"]["fingerprint"] == fingerprint
    assert new.training["capture"]["items"] == 180 and new.training["capture"]["shards"] == 2
    assert new.calibration.split == "val+capture" and new.calibration.n == val + 45
    assert 0.0 < new.default_threshold < 1.0
    # The same cascade as the live one: the gateway's swap accepts it.
    assert (new.name, new.classes, new.teacher) == (live.name, live.classes, live.teacher)


def test_refusals_change_nothing(demo, flywheel, tmp_path):
    _, run, capture, _ = flywheel
    before = (run / "config.yaml").read_text()
    done = train("distill", run, "--capture", capture, "--method", "ce", check=False)
    assert done.returncode == 2 and "--capture cannot be used with method ce" in done.stderr
    assert "Traceback" not in done.stderr
    other = tmp_path / "other"
    idx = np.arange(10)
    capture_like_the_gateway(demo, other / "digits", idx, source=0, classes=list("abcdefghij"))
    done = train("distill", run, "--capture", other, check=False)
    assert done.returncode == 2 and "its classes is" in done.stderr
    assert (run / "config.yaml").read_text() == before


def test_a_plain_distill_forgets_the_capture(flywheel, tmp_path):
    _, run, _, _ = flywheel
    plain = tmp_path / "run"
    shutil.copytree(run, plain)
    assert (plain / "capture.json").is_file()
    train("distill", plain, "--set", "fit.epochs=1")
    assert not (plain / "capture.json").exists() and not (plain / "capture_holdout.npz").exists()
    assert "capture" not in json.loads((plain / "record.json").read_text())


def test_an_anytime_student_calibrates_every_stage_with_the_captured_items(flywheel, tmp_path):
    """B-DISTIL (logit regression on centred log-probabilities for the captured items)."""
    _, run, capture, first = flywheel
    again = tmp_path / "run"
    shutil.copytree(run, again)
    args = ["--method", "bdistil", "--param", "members=2", "--set", "fit.epochs=2"]
    out = train("distill", again, "--capture", capture, "--capture-holdout", "0.25", *args).stdout
    done = json.loads(out.strip().splitlines()[-1])
    assert (done["split"], done["n"]) == ("val+capture", first["n"])
    calibration = json.loads((again / "calibration.json").read_text())
    assert calibration["split"] == "val+capture" and calibration["n"] == first["n"]
    stages = json.loads((again / "stages.json").read_text())
    assert len(stages) == 2 and all(0.0 <= s["threshold"] <= 1.0 for s in stages)
