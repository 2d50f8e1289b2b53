"""Model weights on disk: tensors only, never pickled code."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import torch
from torch import nn


def save_weights(model: nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)


M = TypeVar("M", bound=nn.Module)


def load_weights(model: M, path: Path) -> M:
    """`weights_only=True` refuses pickled code."""
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
