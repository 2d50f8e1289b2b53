"""Captured inputs are in the tensor space training uses: the gateway's preprocessing of a
training item (what a capture shard stores) equals `prepare`'s array for it, bit for bit, and
stays so through a shard and `load_capture`."""

from __future__ import annotations

import numpy as np

from cascade_server.bundle import Bundle
from cascade_server.capture import write_shard
from cascade_server.preprocess import ImagePreprocessor, TextPreprocessor
from cascade_server.train.capture_data import load_capture
from cascade_server.train.data import load, split
from cascade_server.train.demo import DEMO_CONFIG, TEXT_DEMO_CONFIG
from cascade_server.train.stages import prepare
from tests.conftest import png_bytes


def uniform_probs(n: int, classes: int) -> np.ndarray:
    return np.full((n, classes), 1.0 / classes, np.float32)


def as_shard(directory, prep, inputs: dict, n: int):
    directory.mkdir(parents=True, exist_ok=True)
    k = prep.num_classes
    return write_shard(
        directory,
        cascade=prep.config.export.name,
        modality=prep.modality,
        classes=prep.classes,
        inputs=inputs,
        teacher_probs=uniform_probs(n, k),
        student_probs=uniform_probs(n, k),
        margins=np.zeros(n, np.float32),
        source=np.zeros(n, np.uint8),
        student_version="v1",
        teacher_version="t1",
    )


def train_items(config):
    cfg = config
    return split(load(cfg.data.name, **cfg.data.params), seed=cfg.seed, val=cfg.split.val,
                 test=cfg.split.test).train  # fmt: skip


def test_the_gateways_image_preprocessing_is_prepares_normalisation(demo, tmp_path):
    prep = prepare(DEMO_CONFIG)
    spec = Bundle.load(demo.bundle).manifest.preprocess
    assert spec == prep.spec  # the served bundle's mean/std/size are the run's
    raw = train_items(DEMO_CONFIG)
    n = 32
    gateway = ImagePreprocessor(spec, max_pixels=1 << 20)
    tensors = gateway.prepare([png_bytes(img) for img in raw.x[:n]]).tensors
    assert tensors["input"].shape == (n, 1, 8, 8) and tensors["input"].dtype == np.float32
    assert np.array_equal(tensors["input"], prep.x["train"][:n])
    as_shard(tmp_path / "digits", prep, tensors, n)
    mix = load_capture(tmp_path, prep, holdout=0.0)
    assert np.array_equal(mix.train.x, prep.x["train"][:n])


def test_the_gateways_tokenisation_with_the_bundle_tokenizer_is_prepares(tmp_path):
    """The bundle's tokenizer.json is the run's tokenizer saved (export); the gateway's
    input_ids * attention_mask (what the exported student computes) are prepare's ids."""
    run = tmp_path / "run"
    prep = prepare(TEXT_DEMO_CONFIG, run)
    saved = run / prep.spec.tokenizer_file
    assert saved.is_file()
    raw = train_items(TEXT_DEMO_CONFIG)
    n = 32
    gateway = TextPreprocessor(prep.spec, saved, max_chars=10_000)
    tensors = gateway.prepare(list(raw.texts[:n])).tensors
    ids, mask = tensors["input_ids"], tensors["attention_mask"]
    assert ids.shape == (n, TEXT_DEMO_CONFIG.text.max_length) and ids.dtype == np.int64
    assert np.array_equal(ids * mask, prep.x["train"][:n])
    as_shard(tmp_path / "capture" / "intents", prep, tensors, n)
    mix = load_capture(tmp_path / "capture", prep, holdout=0.0)
    assert np.array_equal(mix.train.x, prep.x["train"][:n])


def test_what_the_gateway_captures_is_in_the_training_space(gateway, demo, tmp_path):
    """The in-process gateway with capture on: the delegated items it writes are, through
    load_capture, the normalised images `prepare` makes of the same digits."""
    from cascade_server.config.capture import CaptureConfig
    from cascade_server.preprocess import normalize
    from tests.conftest import b64, easy_and_hard

    manifest = Bundle.load(demo.bundle).manifest
    _, hard = easy_and_hard(demo, manifest.default_threshold, n=5)
    capture = CaptureConfig(directory=tmp_path / "capture", flush_s=0.05)
    with gateway(capture=capture) as (client, _):
        for i in hard:
            r = client.post("/predict", json={"image": b64(png_bytes(demo.images[i]))})
            assert r.json()["answered_by"] == "teacher", r.text
    prep = prepare(DEMO_CONFIG)  # closing the app wrote what was queued
    mix = load_capture(tmp_path / "capture", prep, holdout=0.0)
    assert len(mix.train) == 5 and mix.info["by_source"]["delegated"] == 5
    expected = normalize(demo.images[hard], prep.spec)
    assert np.array_equal(mix.train.x, expected)
    assert (mix.train.labels == 3).all()  # the fake teacher's answer
