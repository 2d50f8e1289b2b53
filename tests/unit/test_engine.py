"""Checkpoints: a run cut off after some epochs and resumed ends where an uninterrupted run
ends; a checkpoint from another configuration is not resumed."""

import numpy as np
import torch

from cascade_server.train.engine import FitConfig, fit, seed_everything
from cascade_server.train.losses import LOSSES
from cascade_server.train.models import build


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 1, 4, 4)).astype(np.float32)
    return x, (x.reshape(200, -1).sum(1) > 0).astype(np.int64)


def fresh():
    seed_everything(0)
    return build("mlp", (1, 4, 4), 2, hidden=[8])


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_resume_matches_an_uninterrupted_run(tmp_path):
    x, y = data()
    loss = LOSSES.get("ce")()
    full = fresh()
    h_full = fit(full, loss, x, y, FitConfig(epochs=6, progress=False))

    ckpt = tmp_path / "s.ckpt"
    cut = fresh()
    # Simulate a crash after 3 epochs: a 6-epoch schedule stopped early, checkpointed.
    from cascade_server.train import engine

    trainer = engine.Trainer(cut, loss, x, y, FitConfig(epochs=6, progress=False))
    history = [trainer.run_epoch() for _ in range(3)]
    engine._save_checkpoint(ckpt, {**trainer.state(history, 3), "key": "k"})

    resumed = fresh()
    h_resumed = fit(
        resumed, loss, x, y, FitConfig(epochs=6, progress=False), checkpoint=ckpt, key="k"
    )
    torch.testing.assert_close(weights(resumed), weights(full))
    assert h_resumed == h_full
    assert torch.load(ckpt, weights_only=True)["epoch"] == 6


def test_a_checkpoint_of_another_configuration_is_ignored(tmp_path):
    x, y = data()
    loss = LOSSES.get("ce")()
    ckpt = tmp_path / "s.ckpt"
    fit(fresh(), loss, x, y, FitConfig(epochs=2, progress=False), checkpoint=ckpt, key="old")
    model = fresh()
    history = fit(
        model, loss, x, y, FitConfig(epochs=2, progress=False), checkpoint=ckpt, key="new"
    )
    assert len(history) == 2  # trained from scratch, not "already done"
    assert torch.load(ckpt, weights_only=True)["key"] == "new"
