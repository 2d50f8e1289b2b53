"""Shared fixtures: the demo cascade, built once per test session into a temporary directory."""

from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@dataclass(frozen=True)
class Demo:
    repository: Path  # Triton model repository (production config + model.onnx)
    bundle: Path  # student bundle directory
    run: Path  # the run directory (training artefacts: teacher.pt, student.pt, records)
    images: np.ndarray  # uint8 (N, 8, 8, 1): all of scikit-learn's digits
    labels: np.ndarray


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    from cascade_server.train.data import DATASETS
    from cascade_server.train.demo import build_demo

    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    root = tmp_path_factory.mktemp("demo")
    run = root / "run"
    bundle = build_demo(root / "model_repository", root / "bundles", progress=False, run_dir=run)
    data = DATASETS.get("digits")()
    return Demo(root / "model_repository", bundle.path, run, data.x, data.y)


@pytest.fixture(scope="session")
def cd3_bundle(demo, tmp_path_factory):
    """A CD-III student distilled from the demo's teacher (imported from its checkpoint)."""
    from cascade_server.bundle import Bundle
    from cascade_server.train.config import ExperimentConfig
    from cascade_server.train.demo import DEMO_CONFIG
    from cascade_server.train.stages import run_all

    root = tmp_path_factory.mktemp("cd3")
    raw = DEMO_CONFIG.model_dump()
    raw.update(
        name="digits-cd3",
        teacher={
            **raw["teacher"],
            "checkpoint": demo.run / "teacher.pt",
        },
        student={"arch": "mlp", "params": {"hidden": [32]}},
        method={"name": "cd3", "params": {"in_domain": [0, 1, 2, 3, 4]}},
        fit={**raw["fit"], "epochs": 30},
        export={**raw["export"], "name": "digitscd3"},
    )
    config = ExperimentConfig.model_validate(raw)
    bundles = root / "bundles"
    run_all(config, root / "run", progress=False, bundles=bundles, repository=root / "repo")
    return Bundle.load(bundles / "digitscd3")


@dataclass(frozen=True)
class TextDemo:
    repository: Path
    bundle: Path
    texts: tuple[str, ...]  # the generated corpus
    labels: np.ndarray


@pytest.fixture(scope="session")
def text_demo(demo) -> TextDemo:
    """The intents demo (text), built beside the digits demo in the same repository."""
    from cascade_server.train.corpus import generate
    from cascade_server.train.demo import build_demo

    bundles = demo.bundle.parent
    bundle = build_demo(demo.repository, bundles, progress=False, name="intents")
    texts, labels, _ = generate(2400, 0)
    return TextDemo(demo.repository, bundle.path, tuple(texts), np.asarray(labels))


def text_margins(text_demo: TextDemo, texts: list[str]) -> np.ndarray:
    """The intents student's margins, computed outside the gateway."""
    import onnxruntime as ort

    from cascade_server.bundle import Bundle
    from cascade_server.policy import softmax, top2_margin
    from cascade_server.preprocess import encode_texts, load_tokenizer

    bundle = Bundle.load(text_demo.bundle)
    spec = bundle.manifest.preprocess
    ids, mask, _ = encode_texts(load_tokenizer(text_demo.bundle / spec.tokenizer_file, spec), texts)
    session = ort.InferenceSession(str(bundle.student_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input_ids": ids, "attention_mask": mask})
    return top2_margin(softmax(logits))


def easy_and_hard_texts(text_demo: TextDemo, threshold: float, n: int = 3):
    texts = list(text_demo.texts[:600])
    margins = text_margins(text_demo, texts)
    order = np.argsort(margins)
    hard = [texts[i] for i in order if margins[i] < threshold * 0.8][:n]
    easy = [texts[i] for i in order[::-1] if margins[i] > min(0.99, threshold + 0.1)][:n]
    assert len(hard) == n and len(easy) == n, "intents student has too few easy or hard texts"
    return easy, hard


def png_bytes(array: np.ndarray, mode: str = "L", fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array)
    img.convert(mode).save(buf, fmt)
    return buf.getvalue()


def huge_png_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims width x height pixels (no pixel data follows)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def student_margins(demo: Demo) -> np.ndarray:
    """The demo student's margins on every digit, computed outside the gateway."""
    import onnxruntime as ort

    from cascade_server.bundle import Bundle
    from cascade_server.policy import softmax, top2_margin
    from cascade_server.preprocess import normalize

    bundle = Bundle.load(demo.bundle)
    session = ort.InferenceSession(str(bundle.student_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": normalize(demo.images, bundle.manifest.preprocess)})
    return top2_margin(softmax(logits))


def easy_and_hard(demo: Demo, threshold: float, n: int = 5) -> tuple[list[int], list[int]]:
    """Indices of digits far above and far below the threshold."""
    margins = student_margins(demo)
    order = np.argsort(margins)
    hard = [int(i) for i in order if margins[i] < threshold * 0.8][:n]
    easy = [int(i) for i in order[::-1] if margins[i] > min(0.99, threshold + 0.1)][:n]
    assert len(hard) == n and len(easy) == n, "demo student has too few easy or hard digits"
    return easy, hard


@pytest.fixture(scope="session", autouse=True)
def _data_cache(tmp_path_factory):
    """Decoded-dataset caches (cascade-train's imagefolder) go to a temporary directory, not
    the user's ~/.cache."""
    import os

    os.environ["CASCADE_DATA_CACHE"] = str(tmp_path_factory.mktemp("data-cache"))


def three_stage_bundle(demo: Demo, root: Path, tier_threshold: float = 0.99, frontier=None):
    """The demo's MLP student, its CNN teacher's graph as a tier run in the gateway ("cnn"),
    and the teacher on Triton: a three-stage cascade from one bundle."""
    import shutil

    from cascade_server.bundle import Bundle, TierRef
    from cascade_server.train.demo import DEMO_TEACHER

    path = root / "digits3"
    shutil.copytree(demo.bundle, path)
    shutil.copyfile(demo.repository / DEMO_TEACHER / "1" / "model.onnx", path / "cnn.onnx")
    bundle = Bundle.load(path)
    tier = TierRef(name="cnn", file="cnn.onnx", threshold=tier_threshold, cost=0.5)
    manifest = bundle.manifest.model_copy(
        update={"tiers": (tier,), "frontier": frontier, "version": "digits3-test"}
    )
    bundle = Bundle(path, type(manifest).model_validate(manifest.model_dump()))
    bundle.save()
    return Bundle.load(path)


def triton_tier_bundle(demo: Demo, root: Path, model: str, tier_threshold: float, name: str):
    """The demo's MLP student, a tier on Triton ("cnn": the Triton model `model`, with the
    teacher's tensor contract), and the teacher: a three-stage cascade whose middle stage is
    remote."""
    import shutil

    from cascade_server.bundle import Bundle, TierRef

    path = root / name
    shutil.copytree(demo.bundle, path)
    bundle = Bundle.load(path)
    ref = bundle.manifest.teacher.model_copy(update={"model_name": model, "model_version": ""})
    tier = TierRef(name="cnn", runtime="triton", model=ref, threshold=tier_threshold, cost=0.5)
    manifest = bundle.manifest.model_copy(update={"tiers": (tier,), "version": name})
    bundle = Bundle(path, type(manifest).model_validate(manifest.model_dump()))
    bundle.save()
    return Bundle.load(path)


def tier_logits(bundle, images: np.ndarray) -> dict[str, np.ndarray]:
    """Every stage's logits but the teacher's, computed outside the gateway."""
    import onnxruntime as ort

    from cascade_server.preprocess import normalize

    x = normalize(images, bundle.manifest.preprocess)
    out = {}
    prev = None
    for name, path, output in [
        ("student", bundle.student_path, bundle.manifest.student_output),
        *[(t.name, bundle.tier_path(t), t.output) for t in bundle.manifest.tiers],
    ]:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {"input": x}
        if prev is not None and name != "student":
            tier = next(t for t in bundle.manifest.tiers if t.name == name)
            if tier.prev_input:
                feeds[tier.prev_input] = prev
        (prev,) = session.run([output], feeds)
        out[name] = prev
    return out
