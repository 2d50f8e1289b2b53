"""The training loop, shared by teachers and every distillation method.

A method supplies a `step(model, batch) -> (loss, logits)`; the loop owns batching, the
optimiser and schedule, progress, checkpoints (resume), and DistributedDataParallel when run
under `torchrun`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from .device import to_device

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
    # The recipe (config.Recipe documents each knob and where the defaults come from).
    optimizer: str = "adamw"
    momentum: float = 0.9
    schedule: str = "onecycle"
    warmup_epochs: float = 0.0
    crop_padding: int = 0
    hflip: bool = False
    amp: bool = True
    channels_last: bool = True


def augment(x: torch.Tensor, padding: int, hflip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crops of the zero-padded images and random horizontal flips, for a (N, C, H, W)
    batch, vectorised on the batch's device; the random numbers come from `gen` (CPU), so a
    run is reproducible whatever the device."""
    n, _, h, w = x.shape
    if padding:
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(x.device)
        dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    if hflip:
        flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def schedule(
    opt: torch.optim.Optimizer, config: FitConfig, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total_steps)
    warmup = int(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:  # linear warm-up, then cosine to 0
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def optimizer(params, config: FitConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.momentum > 0,
            weight_decay=config.weight_decay,
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


@dataclass
class Batch:
    x: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor | None  # cached teacher logits for these examples, if any
    idx: torch.Tensor  # positions in the training arrays (per-example state, e.g. a guide)


Step = Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]


def loss_step(loss_fn: nn.Module, **extra) -> Step:
    def step(model: nn.Module, b: Batch):
        logits = model(b.x)
        return loss_fn(logits, b.t, b.y, **extra), logits

    return step


def distributed() -> tuple[int, int]:
    """(rank, world size); (0, 1) when not under torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> None:
    """Called once by the CLI: joins the process group when launched by torchrun."""
    if "RANK" in os.environ and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


def shutdown_distributed() -> None:
    """Leaves the process group, if this process joined one (NCCL warns otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class Trainer:
    """One model, one optimiser and schedule, epochs on demand. `fit` drives one; methods that
    alternate two models (DiSK's student and guide) drive two."""

    def __init__(
        self,
        model: nn.Module,
        step: Step | nn.Module,
        x: np.ndarray,
        y: np.ndarray,
        config: FitConfig,
        *,
        teacher_logits: np.ndarray | None = None,
        parameters=None,
        epochs: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.step = loss_step(step) if isinstance(step, nn.Module) else step
        self.config = config
        self.gen = generator if generator is not None else seed_everything(config.seed)
        self.device = torch.device(config.device)
        self.rank, self.world = distributed()
        cuda = self.device.type == "cuda"
        self.images = x.ndim == 4 and np.issubdtype(x.dtype, np.floating)
        self.channels_last = cuda and config.channels_last and self.images
        self.model = model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.trained = self.model
        if self.world > 1:
            self.trained = nn.parallel.DistributedDataParallel(self.model)
        # The training arrays live on the device for the whole run: no per-batch copies.
        self.xs, self.ys = to_device(x, self.device), to_device(y, self.device)
        self.ts = to_device(teacher_logits, self.device) if teacher_logits is not None else None
        self.opt = optimizer(parameters if parameters is not None else model.parameters(), config)
        per_rank = len(self.xs) // self.world if self.world > 1 else len(self.xs)
        steps_per_epoch = max(1, -(-per_rank // config.batch_size))
        total = (epochs or config.epochs) * steps_per_epoch
        self.sched = schedule(self.opt, config, total, steps_per_epoch)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if cuda and config.amp else None
        )
        self.last_accuracy = 0.0

    def run_epoch(self) -> float:
        self.model.train()
        perm = torch.randperm(len(self.xs), generator=self.gen)
        if self.world > 1:
            # Equal shards: DDP's collectives hang if one rank runs an extra batch.
            perm = perm[: len(perm) // self.world * self.world][self.rank :: self.world]
        total, correct, seen = 0.0, 0, 0
        for begin in range(0, len(perm), self.config.batch_size):
            idx = perm[begin : begin + self.config.batch_size]
            on_device = idx.to(self.device)
            x = self.xs[on_device]
            if self.images and (self.config.crop_padding or self.config.hflip):
                x = augment(x, self.config.crop_padding, self.config.hflip, self.gen)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            batch = Batch(
                x,
                self.ys[on_device],
                self.ts[on_device] if self.ts is not None else None,
                idx,
            )
            with self.autocast or contextlib.nullcontext():
                loss, logits = self.step(self.trained, batch)
            self.opt.zero_grad(set_to_none=True)
            loss.float().backward()
            self.opt.step()
            self.sched.step()
            total += float(loss.detach()) * len(idx)
            if logits is not None and logits.shape[1] > int(batch.y.max()):
                correct += int((logits.detach().argmax(1) == batch.y).sum())
            seen += len(idx)
        stats = torch.tensor([total, correct, seen], dtype=torch.float64)
        if self.world > 1:
            dist.all_reduce(stats)
        self.last_accuracy = float(stats[1] / stats[2])
        self.model.eval()
        return float(stats[0] / stats[2])

    def state(self, history: list[float], epoch: int) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "generator": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": torch.tensor(history, dtype=torch.float64),
            "epoch": epoch,
        }

    def restore(self, state: dict) -> tuple[list[float], int]:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        return state["history"].tolist(), int(state["epoch"])


def fit(
    model: nn.Module,
    step: Step | nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    config: FitConfig,
    *,
    teacher_logits: np.ndarray | None = None,
    desc: str = "train",
    checkpoint: Path | None = None,
    parameters=None,
    key: str = "",
) -> list[float]:
    """Trains `model` on float32 inputs `x` (already normalised). Returns the mean loss per
    epoch. With `checkpoint`, state is saved after every epoch and a run resumes from it, if
    the checkpoint was written under the same `key` (a hash of the experiment's config)."""
    trainer = Trainer(
        model, step, x, y, config, teacher_logits=teacher_logits, parameters=parameters
    )
    history: list[float] = []
    start = 0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if state.get("key", "") == key:
            history, start = trainer.restore(state)
            log.info("%s: resuming from %s at epoch %d", desc, checkpoint, start)
        else:
            log.warning("%s: %s belongs to another configuration; starting over", desc, checkpoint)
    bar = tqdm(
        range(start, config.epochs),
        desc=desc,
        leave=False,
        disable=not config.progress or trainer.rank > 0,
    )
    for epoch in bar:
        history.append(trainer.run_epoch())
        bar.set_postfix(loss=f"{history[-1]:.4f}", acc=f"{trainer.last_accuracy:.3f}")
        if checkpoint is not None and trainer.rank == 0:
            _save_checkpoint(checkpoint, {**trainer.state(history, epoch + 1), "key": key})
    model.eval()
    return history


def _save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
