"""Captured traffic as training data (cascade_server/train/capture_data.py): shards written with
the capture module's own writer from the digits data, read back, checked, split and mixed."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from cascade_server.capture import write_shard
from cascade_server.train import capture_data
from cascade_server.train.capture_data import (
    CaptureMix,
    check_method,
    load_capture,
    teacher_logits,
)
from cascade_server.train.demo import DEMO_CONFIG, TEXT_DEMO_CONFIG
from cascade_server.train.stages import prepare


@pytest.fixture(scope="module")
def prep():
    return prepare(DEMO_CONFIG)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


def shard(directory: Path, inputs: dict, n_classes: int, *, source: int, seed: int, **meta):
    rng = np.random.default_rng(seed)
    n = len(next(iter(inputs.values())))
    fields = dict(
        cascade="digits",
        modality="image",
        classes=[str(i) for i in range(n_classes)],
        student_version="digits-v1",
        teacher_version="digits_teacher/1",
        created=1_700_000_000.0 + seed,
    )
    fields.update(meta)
    return write_shard(
        directory,
        inputs=inputs,
        teacher_probs=softmax(rng.normal(0, 3, (n, n_classes))),
        student_probs=softmax(rng.normal(0, 1, (n, n_classes))),
        margins=rng.random(n).astype(np.float32),
        source=np.full(n, source, np.uint8),
        **fields,
    )


@pytest.fixture
def capture_dir(prep, tmp_path):
    """DIR/digits/: 40 delegated items and 20 shadow samples (the test split's images, as the
    gateway's preprocessing makes them: `normalize` with the run's spec)."""
    root = tmp_path / "capture"
    (root / "digits").mkdir(parents=True)
    x = prep.x["test"]
    shard(root / "digits", {"input": x[:40]}, 10, source=0, seed=1)
    shard(root / "digits", {"input": x[40:60]}, 10, source=1, seed=2)
    return root


def test_items_are_mixed_with_their_soft_labels_and_a_share_held_back(prep, capture_dir):
    mix = load_capture(capture_dir, prep, holdout=0.25, repeat=2)
    assert (len(mix.train), len(mix.holdout)) == (45, 15)
    # A quarter of each source: 10 of the 40 delegated items, 5 of the 20 shadow samples.
    assert np.bincount(mix.holdout.source).tolist() == [10, 5]
    info = mix.info
    assert (info["items"], info["train_items"], info["holdout_items"]) == (60, 45, 15)
    assert info["by_source"] == {"delegated": 40, "shadow": 20}
    assert [s["items"] for s in info["shards"]] == [40, 20] and len(info["fingerprint"]) == 16
    assert info["student_versions"] == ["digits-v1"]
    # Held-back and training items are disjoint and together every captured image.
    seen = np.concatenate([mix.train.x, mix.holdout.x]).reshape(60, -1)
    assert len(np.unique(seen, axis=0)) == 60
    assert sorted(map(bytes, seen)) == sorted(map(bytes, prep.x["test"][:60].reshape(60, -1)))

    x, y, t = mix.mix(prep.x["train"], prep.y["train"], np.zeros((len(prep.y["train"]), 10)))
    n = len(prep.y["train"])
    assert x.shape == (n + 90, 1, 8, 8) and x.dtype == np.float32 and y.shape == t.shape[:1]
    # The soft targets are the teacher's captured probabilities, its argmax the hard label.
    assert np.allclose(softmax(t[n:]), np.tile(mix.train.probs, (2, 1)), atol=1e-6)
    assert (y[n:] == np.tile(mix.train.probs.argmax(1), 2)).all()
    assert (x[n : n + 45] == mix.train.x).all() and (x[n + 45 :] == mix.train.x).all()


def test_the_holdout_is_deterministic_and_the_fingerprint_follows_the_data(prep, capture_dir):
    a = load_capture(capture_dir, prep, holdout=0.2)
    b = load_capture(capture_dir, prep, holdout=0.2)
    assert a.fingerprint == b.fingerprint and (a.holdout.x == b.holdout.x).all()
    assert load_capture(capture_dir, prep, holdout=0.3).fingerprint != a.fingerprint
    shard(capture_dir / "digits", {"input": prep.x["test"][60:70]}, 10, source=1, seed=3)
    more = load_capture(capture_dir, prep, holdout=0.2)
    assert more.info["items"] == 70 and more.fingerprint != a.fingerprint


def test_log_probabilities_are_the_teacher_logits_under_any_temperature():
    z = np.array([[4.0, 1.0, -2.0], [0.5, 0.0, 30.0]], np.float32)
    p = softmax(z)
    for temperature in (1.0, 4.0):
        assert np.allclose(softmax(teacher_logits(p) / temperature), softmax(z / temperature))
    # A probability of 0 (float32 underflow) is floored: finite, and still the least likely.
    floored = teacher_logits(np.array([[1.0, 0.0]], np.float32))
    assert np.isfinite(floored).all() and floored[0, 1] < -80


def test_a_corrupt_shard_is_skipped_with_a_warning(prep, capture_dir, caplog):
    bad = capture_dir / "digits" / "capture-1700000009000-1-0.npz"
    bad.write_bytes(b"PK\x03\x04 not a zip at all")
    with caplog.at_level(logging.WARNING, logger="cascade_server.capture"):
        mix = load_capture(capture_dir, prep)
    assert mix.info["items"] == 60 and bad.name not in {s["file"] for s in mix.info["shards"]}
    assert any(bad.name in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)


def test_other_classes_or_another_cascade_are_refused(prep, tmp_path):
    x = prep.x["test"][:5]
    (tmp_path / "a" / "digits").mkdir(parents=True)
    shard(tmp_path / "a" / "digits", {"input": x}, 10, source=0, seed=1, classes=list("abcdefghij"))
    with pytest.raises(ValueError, match=r"its classes is .* this run.s is"):
        load_capture(tmp_path / "a", prep)
    (tmp_path / "b" / "intents").mkdir(parents=True)
    shard(tmp_path / "b" / "intents", {"input": x}, 10, source=0, seed=1, cascade="intents")
    with pytest.raises(ValueError, match="its cascade is 'intents', this run's is 'digits'"):
        load_capture(tmp_path / "b", prep)
    (tmp_path / "c").mkdir()
    with pytest.raises(ValueError, match="no valid capture shard"):
        load_capture(tmp_path / "c", prep)


def test_images_in_another_tensor_space_are_refused(prep, tmp_path):
    """A capture normalised with another mean/std (or at another size) is not this run's
    space: the normalisation inverted does not give whole grey levels."""
    (tmp_path / "digits").mkdir()
    raw = np.round(prep.x["test"][:5] * 0.5 + 0.5, 6)  # the same pixels, as x/255
    shard(tmp_path / "digits", {"input": raw.astype(np.float32) * 0.9}, 10, source=0, seed=1)
    with pytest.raises(ValueError, match="normalised with another mean/std"):
        load_capture(tmp_path, prep)
    other = tmp_path / "other"
    (other / "digits").mkdir(parents=True)
    shard(other / "digits", {"input": np.zeros((3, 1, 16, 16), np.float32)}, 10, source=0, seed=1)
    with pytest.raises(ValueError, match=r"images of shape \(1, 16, 16\)"):
        load_capture(other, prep)


def test_methods_that_cannot_learn_from_soft_labels_are_refused():
    with pytest.raises(ValueError, match="cannot be used with method ce"):
        check_method("ce", {})
    with pytest.raises(ValueError, match="teacher_logits=train"):
        check_method("md", {})
    check_method("md", {"teacher_logits": "train"})
    for name in ("kd", "cd1", "cd3", "kdplus", "disk", "bdistil"):
        check_method(name, {})


def test_the_run_directory_keeps_the_holdout_until_a_plain_distill(prep, capture_dir, tmp_path):
    mix: CaptureMix = load_capture(capture_dir, prep)
    capture_data.save_state(tmp_path, mix)
    held = capture_data.load_holdout(tmp_path)
    assert held is not None and (held.x == mix.holdout.x).all()
    info = capture_data.load_info(tmp_path)
    assert info == mix.info
    version = capture_data.versioned("digits-v1", info)
    assert version == f"digits-v1-c{mix.fingerprint[:8]}"
    summary = capture_data.summary(info)
    assert summary["shards"] == 2 and summary["items"] == 60
    capture_data.clear_state(tmp_path)
    assert capture_data.load_holdout(tmp_path) is None and capture_data.load_info(tmp_path) is None
    assert capture_data.versioned("digits-v1", None) == "digits-v1"


def test_text_items_become_the_token_ids_the_student_sees(tmp_path):
    text = prepare(TEXT_DEMO_CONFIG)
    ids, y = text.x["test"][:8], text.y["test"][:8]
    mask = (ids != 0).astype(np.int64)
    garbage = np.where(mask == 0, 7, ids)  # what lies under the mask is never seen
    (tmp_path / "intents").mkdir()
    classes = list(text.classes)
    fields = dict(cascade="intents", modality="text", classes=classes)
    inputs = {"input_ids": garbage, "attention_mask": mask}
    shard(tmp_path / "intents", inputs, len(classes), source=0, seed=1, **fields)
    mix = load_capture(tmp_path, text, holdout=0.0)
    assert (mix.train.x == ids).all() and mix.train.x.dtype == np.int64 and len(y) == 8
    short = {"input_ids": ids[:, :10], "attention_mask": mask[:, :10]}
    (tmp_path / "short" / "intents").mkdir(parents=True)
    shard(tmp_path / "short" / "intents", short, len(classes), source=0, seed=1, **fields)
    with pytest.raises(ValueError, match="texts of 10 tokens, this run's max_length is 24"):
        load_capture(tmp_path / "short", text)
    big = {"input_ids": ids + 10**6, "attention_mask": mask}
    (tmp_path / "big" / "intents").mkdir(parents=True)
    shard(tmp_path / "big" / "intents", big, len(classes), source=0, seed=1, **fields)
    with pytest.raises(ValueError, match="outside this run's vocabulary"):
        load_capture(tmp_path / "big", text)
