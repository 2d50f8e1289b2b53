"""The training loop, shared by teachers and every distillation method.

A method supplies a `step(model, batch) -> (loss, logits)`; the loop owns batching, the
optimiser and schedule, progress, checkpoints (resume), and DistributedDataParallel when run
under `torchrun`.
"""

from __future__ import annotations

import logging
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
        self.model = model.to(self.device)
        self.trained = model
        if self.world > 1:
            self.trained = nn.parallel.DistributedDataParallel(model)
        self.xs, self.ys = torch.from_numpy(x), torch.from_numpy(y)
        self.ts = torch.from_numpy(teacher_logits) if teacher_logits is not None else None
        self.opt = torch.optim.AdamW(
            parameters if parameters is not None else model.parameters(),
            lr=config.lr,
            weight_decay=config.weight_decay,
        )
        per_rank = len(self.xs) // self.world if self.world > 1 else len(self.xs)
        steps_per_epoch = max(1, -(-per_rank // config.batch_size))
        self.sched = torch.optim.lr_scheduler.OneCycleLR(
            self.opt, max_lr=config.lr, total_steps=(epochs or config.epochs) * steps_per_epoch
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
            batch = Batch(
                self.xs[idx].to(self.device),
                self.ys[idx].to(self.device),
                self.ts[idx].to(self.device) if self.ts is not None else None,
                idx,
            )
            loss, logits = self.step(self.trained, batch)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
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
