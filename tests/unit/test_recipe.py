"""The training recipe's pieces: augmentation, optimiser and schedule choices, label smoothing."""

import math

import numpy as np
import pytest
import torch

from cascade_server.train.config import ExperimentConfig
from cascade_server.train.engine import FitConfig, augment, optimizer, schedule
from cascade_server.train.losses import LOSSES


def test_random_crop_is_a_window_of_the_zero_padded_image():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5) + 1
    out = augment(x, padding=2, hflip=False, gen=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, dy : dy + 5, dx : dx + 5] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_flips_are_horizontal_random_and_reproducible():
    x = torch.randn(64, 1, 4, 4)
    a = augment(x, 0, True, torch.Generator().manual_seed(1))
    b = augment(x, 0, True, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    flipped = [torch.equal(a[i], x[i].flip(2)) for i in range(64)]
    same = [torch.equal(a[i], x[i]) for i in range(64)]
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert 10 < sum(flipped) < 54
    assert torch.equal(augment(x, 0, False, torch.Generator()), x)


def test_sgd_cosine_with_warmup():
    config = FitConfig(optimizer="sgd", lr=0.1, momentum=0.9, schedule="cosine", warmup_epochs=2)
    params = [torch.nn.Parameter(torch.zeros(1))]
    opt = optimizer(params, config)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] is True
    sched = schedule(opt, config, total_steps=100, steps_per_epoch=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1 / 20)
    assert lrs[19] == pytest.approx(0.1)  # end of the 2-epoch warm-up
    assert lrs[20 + 40] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[-1] < 0.001


def test_label_smoothing_golden_value():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    target = torch.tensor([0])
    got = float(LOSSES.get("ce")(label_smoothing=0.3)(logits, None, target))
    logp = torch.log_softmax(logits, 1)[0].numpy()
    expected = -(0.7 * logp[0] + 0.1 * logp.sum())
    assert got == pytest.approx(float(expected), abs=1e-6)


def test_recipes_are_config_and_validated():
    c = ExperimentConfig.model_validate(
        {
            "teacher": {
                "optimizer": "sgd",
                "crop_padding": 4,
                "hflip": True,
                "label_smoothing": 0.1,
            },
            "fit": {"schedule": "cosine", "warmup_epochs": 1},
        }
    )
    assert (c.teacher.optimizer, c.fit.optimizer) == ("sgd", "adamw")
    with pytest.raises(ValueError):
        ExperimentConfig.model_validate({"teacher": {"optimizer": "adam2"}})
    with pytest.raises(ValueError):
        ExperimentConfig.model_validate({"fit": {"crop_padding": -1}})
    assert np.isfinite(c.teacher.momentum)
