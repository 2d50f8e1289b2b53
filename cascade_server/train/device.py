"""Every tensor on the model's device: the one helper the engine, stages, methods and teachers
use to move inputs, so that a model on CUDA never meets a CPU batch (and back to numpy)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn


def device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters (or buffers) live; CPU for a model that has none."""
    for parameter in model.parameters():
        return parameter.device
    for buffer in model.buffers():
        return buffer.device
    return torch.device("cpu")


def to_device(x: np.ndarray | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A numpy array or tensor on `device` (no copy when it is already there)."""
    tensor = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    return tensor.to(device, non_blocking=True)


@torch.no_grad()
def chunked(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: np.ndarray,
    device: torch.device | str,
    batch_size: int = 512,
) -> np.ndarray:
    """`fn` over `x` in chunks on `device`, concatenated back on the host as numpy."""
    outs = [
        fn(to_device(x[i : i + batch_size], device)).float().cpu().numpy()
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)
