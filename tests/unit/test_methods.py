"""Each method trains on small generated data in seconds: its loss goes down and its student
beats chance by a wide margin."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cascade_server.policy import class_probabilities, decide
from cascade_server.train.engine import FitConfig, fit
from cascade_server.train.losses import LOSSES
from cascade_server.train.methods import (
    METHODS,
    Context,
    Ensemble,
    disk_delta,
    disk_lambda,
    params_for,
)
from cascade_server.train.models import build
from cascade_server.train.teachers import TorchTeacher

N_CLASSES = 4


@pytest.fixture(scope="module")
def data():
    """4 classes of 8x8 'images': class templates plus noise, some classes close."""
    rng = np.random.default_rng(0)
    templates = rng.normal(0, 1, (N_CLASSES, 1, 8, 8)).astype(np.float32)
    templates[3] = 0.6 * templates[2] + 0.4 * templates[3]  # a confusable pair
    y = rng.integers(0, N_CLASSES, 600)
    x = templates[y] + rng.normal(0, 0.8, (600, 1, 8, 8)).astype(np.float32)
    return x.astype(np.float32), y.astype(np.int64)


@pytest.fixture(scope="module")
def teacher(data):
    x, y = data
    model = build("mlp", (1, 8, 8), N_CLASSES, hidden=[64])
    fit(model, LOSSES.get("ce")(), x, y, FitConfig(epochs=15, progress=False))
    return TorchTeacher(model, "mlp", {"hidden": [64]})


def context(data, teacher, epochs: int = 8) -> Context:
    x, y = data
    return Context(
        x_train=x,
        y_train=y,
        in_shape=(1, 8, 8),
        num_classes=N_CLASSES,
        teacher=teacher,
        student_arch="mlp",
        student_kwargs={"hidden": [8]},
        fit=FitConfig(epochs=epochs, lr=1e-2, progress=False),
    )


def class_accuracy(result, x, y) -> tuple[float, np.ndarray]:
    with torch.no_grad():
        logits = result.model(torch.from_numpy(x)).numpy()
    probs = class_probabilities(decide(logits, 0.0).probs, result.output_classes, N_CLASSES)
    return float((probs.argmax(1) == y).mean()), logits


def test_teacher_is_good(data, teacher):
    x, y = data
    assert (teacher.logits(x).argmax(1) == y).mean() > 0.85


@pytest.mark.parametrize("name", ["ce", "kd", "md", "cd1", "kdplus", "disk", "bdistil"])
def test_method_trains(name, data, teacher):
    x, y = data
    params = params_for(name, {"in_domain": [0, 1]} if name.startswith("cd") else {})
    result = METHODS.get(name)().train(context(data, teacher), params)
    assert result.history[-1] < result.history[0], result.history
    acc, _ = class_accuracy(result, x, y)
    assert acc > 0.6, f"{name}: accuracy {acc}"


@pytest.mark.parametrize("name", ["cd2", "cd3"])
def test_class_specific_students_are_right_in_domain(name, data, teacher):
    x, y = data
    result = METHODS.get(name)().train(
        context(data, teacher), params_for(name, {"in_domain": [0, 1]})
    )
    assert result.history[-1] < result.history[0]
    inside = np.isin(y, [0, 1])
    acc, _logits = class_accuracy(result, x[inside], y[inside])
    assert acc > 0.8
    if name == "cd3":
        assert result.output_classes == [0, 1, -1] and result.abstain_output == 2
        # Out-of-domain items mostly land on the abstain output: delegated.
        _, out_logits = class_accuracy(result, x[~inside], y[~inside])
        assert (out_logits.argmax(1) == 2).mean() > 0.8
    else:
        assert result.in_domain_classes == [0, 1]


def test_in_domain_default_is_the_most_frequent_classes(data, teacher):
    _x, y = data
    y = np.where(y == 3, 1, y)  # class 1 now the most frequent
    ctx = dataclasses.replace(context(data, teacher), y_train=y)
    from cascade_server.train.methods import in_domain_classes

    top = in_domain_classes(ctx, params_for("cd1", {"top_k_classes": 1}))
    assert top == [1]
    with pytest.raises(ValueError, match="within"):
        in_domain_classes(ctx, params_for("cd1", {"in_domain": [7]}))


def test_kdplus_queries_the_teacher_online_on_mixed_inputs(data, teacher):
    seen = []

    class Spy:
        def __init__(self, inner):
            self.inner = inner

        def logits(self, x):
            return self.inner.logits(x)

        def torch_logits(self, x):
            seen.append(x.clone())
            return self.inner.torch_logits(x)

    ctx = context(data, Spy(teacher), epochs=1)
    METHODS.get("kdplus")().train(ctx, params_for("kdplus"))
    assert len(seen) == -(-len(data[0]) // 64)  # one query per batch
    flat = torch.from_numpy(data[0]).flatten(1)
    # the queried inputs are interpolations, not training points
    assert not any((flat == s[0].flatten()).all(1).any() for s in seen[:5])


def test_disk_guide_on_teacher_features(data, teacher):
    x, y = data
    result = METHODS.get("disk")().train(
        context(data, teacher, epochs=3), params_for("disk", {"guide_input": "features"})
    )
    assert class_accuracy(result, x, y)[0] > 0.6


def test_disk_schedules():
    assert disk_lambda(0, 1, 5, 50) == 1
    assert disk_lambda(25, 1, 5, 50) == pytest.approx(3)
    assert disk_lambda(49, 1, 5, 50) == pytest.approx(5, abs=0.01)
    assert disk_delta(0, 0.6, 0.9, 0.4, 20) == pytest.approx(0.6)
    assert disk_delta(20, 0.6, 0.9, 0.4, 20) == pytest.approx(0.54)
    assert disk_delta(19, 0.6, 0.9, 0.4, 20) == pytest.approx(0.4, abs=0.01)
    assert disk_delta(200, 0.6, 0.9, 0.4, 20) == pytest.approx(0.4)


def test_bdistil_is_an_anytime_ensemble(data, teacher):
    x, _y = data
    params = params_for("bdistil", {"members": 3, "connect": True})
    result = METHODS.get("bdistil")().train(context(data, teacher), params)
    assert isinstance(result.model, Ensemble) and result.stages == 3
    with torch.no_grad():
        stages = result.model.stages(torch.from_numpy(x))
    agreement = [float((s.argmax(1).numpy() == teacher.logits(x).argmax(1)).mean()) for s in stages]
    assert agreement[-1] >= agreement[0] - 0.02 and agreement[-1] > 0.6, agreement
    torch.testing.assert_close(stages[-1], result.model(torch.from_numpy(x)))


def test_unknown_parameter_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"kd has no parameter \['temp'\]; it takes: \['a', 'b'"):
        params_for("kd", {"temp": 2})
