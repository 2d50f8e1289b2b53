"""The training loop, shared by teachers and every distillation method."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class FitConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


def fit(
    model: nn.Module,
    loss_fn: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    config: FitConfig,
    teacher_logits: np.ndarray | None = None,
    desc: str = "train",
) -> list[float]:
    """Trains `model` on float32 inputs `x` (already normalised). `teacher_logits` are cached
    per example, for methods whose inputs are fixed. Returns the mean loss per epoch."""
    gen = seed_everything(config.seed)
    device = torch.device(config.device)
    model.to(device).train()
    xs = torch.from_numpy(x)
    ys = torch.from_numpy(y)
    ts = torch.from_numpy(teacher_logits) if teacher_logits is not None else None
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, -(-len(xs) // config.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
    )
    history = []
    bar = tqdm(range(config.epochs), desc=desc, disable=not config.progress, leave=False)
    for _ in bar:
        perm = torch.randperm(len(xs), generator=gen)
        total, seen = 0.0, 0
        for start in range(0, len(xs), config.batch_size):
            idx = perm[start : start + config.batch_size]
            xb, yb = xs[idx].to(device), ys[idx].to(device)
            tb = ts[idx].to(device) if ts is not None else None
            loss = loss_fn(model(xb), tb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        history.append(total / seen)
        bar.set_postfix(loss=f"{history[-1]:.4f}")
    model.eval()
    return history


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 512, device: str = "cpu"):
    model.to(device).eval()
    out = [
        model(torch.from_numpy(x[i : i + batch_size]).to(device)).float().cpu().numpy()
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(out)


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())
