"""Every distillation method trains a text student (token ids) in seconds; KD+ mixes in
embedding space; text models export to ONNX with (input_ids, attention_mask)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cascade_server.policy import class_probabilities, decide
from cascade_server.train.engine import FitConfig, fit
from cascade_server.train.losses import LOSSES
from cascade_server.train.methods import METHODS, Context, params_for
from cascade_server.train.models import build, count_macs
from cascade_server.train.teachers import TorchTeacher

VOCAB, LENGTH, N_CLASSES = 60, 10, 4


@pytest.fixture(scope="module")
def data():
    """Class k's texts use words from its own band of the vocabulary, plus shared filler."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, N_CLASSES, 500)
    ids = np.zeros((500, LENGTH), np.int64)
    for i, label in enumerate(y):
        n = int(rng.integers(4, LENGTH + 1))
        own = rng.integers(2 + 10 * label, 12 + 10 * label, n)
        filler = rng.integers(42, VOCAB, n)
        ids[i, :n] = np.where(rng.random(n) < 0.6, own, filler)
    return ids, y.astype(np.int64)


@pytest.fixture(scope="module")
def teacher(data):
    x, y = data
    model = build("transformer", (VOCAB, LENGTH), N_CLASSES, dim=32, heads=2, layers=1, ff=64)
    fit(model, LOSSES.get("ce")(), x, y, FitConfig(epochs=12, lr=3e-3, progress=False))
    return TorchTeacher(model, "transformer", {})


def ctx(data, teacher, arch="bag", epochs=8, **kw) -> Context:
    x, y = data
    return Context(
        x_train=x,
        y_train=y,
        in_shape=(VOCAB, LENGTH),
        num_classes=N_CLASSES,
        teacher=teacher,
        student_arch=arch,
        student_kwargs=kw or {"dim": 8},
        fit=FitConfig(epochs=epochs, lr=1e-2, progress=False),
    )


def test_the_text_teacher_learns(data, teacher):
    x, y = data
    assert (teacher.logits(x).argmax(1) == y).mean() > 0.9


@pytest.mark.parametrize("name", ["kd", "md", "cd1", "kdplus", "disk", "bdistil"])
def test_text_methods_train(name, data, teacher):
    x, y = data
    overrides = {"in_domain": [0, 1]} if name.startswith("cd") else {}
    result = METHODS.get(name)().train(ctx(data, teacher), params_for(name, overrides))
    assert result.history[-1] < result.history[0]
    with torch.no_grad():
        logits = result.model(torch.from_numpy(x)).numpy()
    probs = class_probabilities(decide(logits, 0).probs, result.output_classes, N_CLASSES)
    assert (probs.argmax(1) == y).mean() > 0.6


def test_cd3_text_student_abstains_out_of_domain(data, teacher):
    x, y = data
    result = METHODS.get("cd3")().train(
        ctx(data, teacher), params_for("cd3", {"in_domain": [0, 1]})
    )
    with torch.no_grad():
        top = result.model(torch.from_numpy(x)).argmax(1).numpy()
    assert (top[y >= 2] == 2).mean() > 0.8


def test_kdplus_on_text_needs_a_pytorch_teacher(data):
    class LogitsOnly:
        def logits(self, x):
            return np.zeros((len(x), N_CLASSES), np.float32)

    with pytest.raises(ValueError, match="embedding space"):
        METHODS.get("kdplus")().train(ctx(data, LogitsOnly(), epochs=1), params_for("kdplus"))


@pytest.mark.parametrize("arch", ["bag", "textcnn", "transformer"])
def test_text_models_export_and_run_in_onnx_runtime(arch, tmp_path):
    import onnxruntime as ort

    from cascade_server.train.to_onnx import export_onnx

    model = build(arch, (VOCAB, LENGTH), N_CLASSES)
    path = export_onnx(model, (VOCAB, LENGTH), tmp_path / "m.onnx", modality="text")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    ids = np.array([[5, 6, 7, 0, 0, 0, 0, 0, 0, 0]], np.int64)
    (got,) = session.run(None, {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)})
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert count_macs(model, (VOCAB, LENGTH), "text") > 0


def test_bigrams_are_hashed_in_the_graph(tmp_path):
    model = build("bag", (VOCAB, LENGTH), N_CLASSES, dim=4, buckets=16).eval()
    a = torch.tensor([[3, 4, 0, 0, 0, 0, 0, 0, 0, 0]])
    b = torch.tensor([[4, 3, 0, 0, 0, 0, 0, 0, 0, 0]])
    with torch.no_grad():  # same tokens, other order: only bigrams tell them apart
        assert not torch.allclose(model(a), model(b))
        unigram = build("bag", (VOCAB, LENGTH), N_CLASSES, dim=4, buckets=0).eval()
        torch.testing.assert_close(unigram(a), unigram(b))
