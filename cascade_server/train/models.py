"""Architecture registry: builders take the input shape (C, H, W) and the class count."""

from __future__ import annotations

import torch
from torch import nn

from ..registry import Registry

ARCHITECTURES: Registry = Registry("architecture")


@ARCHITECTURES.register("mlp")
def mlp(
    in_shape: tuple[int, int, int], num_classes: int, hidden: tuple[int, ...] = (64,)
) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_shape[0] * in_shape[1] * in_shape[2]
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@ARCHITECTURES.register("cnn")
def cnn(in_shape: tuple[int, int, int], num_classes: int, width: int = 32) -> nn.Module:
    """Two conv blocks and a linear head; works from 8x8 up."""
    c = in_shape[0]
    return nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


def build(name: str, in_shape: tuple[int, int, int], num_classes: int, **kwargs) -> nn.Module:
    return ARCHITECTURES.get(name)(in_shape, num_classes, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, in_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one forward pass (Linear and Conv layers)."""
    total = 0

    def hook(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += module.in_features * module.out_features
        elif isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += output[0].numel() * (module.in_channels // module.groups) * k

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Linear | nn.Conv2d)
    ]
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, *in_shape))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total
