"""Architecture registry. Builders take the input shape (C, H, W) and the class count, and
return a `Classifier`: `features(x)` (penultimate activations, read by DiSK's guide) then
`head`. Sizes are reported in parameters and MACs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Registry

ARCHITECTURES: Registry = Registry("architecture")


class Classifier(nn.Module):
    def __init__(self, body: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.body = body
        self.head = head
        # Width of `features(x)`; fixed even if a wider head is swapped in (B-DISTIL connect).
        self.feature_dim = head.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@ARCHITECTURES.register("mlp")
def mlp(in_shape, num_classes: int, hidden: tuple[int, ...] | list[int] = (64,)) -> Classifier:
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_shape[0] * in_shape[1] * in_shape[2]
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return Classifier(nn.Sequential(*layers), nn.Linear(width, num_classes))


@ARCHITECTURES.register("cnn")
def cnn(in_shape, num_classes: int, width: int = 32) -> Classifier:
    """Three conv blocks and a linear head; works from 8x8 up. `width` scales every layer."""
    c = in_shape[0]
    body = nn.Sequential(
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
    )
    return Classifier(body, nn.Linear(2 * width, num_classes))


@ARCHITECTURES.register("lenet")
def lenet(in_shape, num_classes: int, width: int = 32, hidden: int = 128) -> Classifier:
    """conv-pool-conv-pool-dense: pools early, so it is cheap on CPU for its accuracy."""
    c, h, w = in_shape
    body = nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * (h // 4) * (w // 4), hidden),
        nn.ReLU(),
    )
    return Classifier(body, nn.Linear(hidden, num_classes))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _resnet(in_shape, num_classes: int, blocks: tuple[int, ...], widths: tuple[int, ...]):
    """CIFAR-style ResNet: a 3x3 stem, then stages of BasicBlocks (stride 2 from the second)."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_shape[0], widths[0], 3, 1, 1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(),
    ]
    cin = widths[0]
    for i, (n, w) in enumerate(zip(blocks, widths, strict=True)):
        for j in range(n):
            layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
            cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Classifier(nn.Sequential(*layers), nn.Linear(cin, num_classes))


def _register_cifar_resnet(depth: int) -> None:
    n = (depth - 2) // 6

    @ARCHITECTURES.register(f"resnet{depth}")
    def build(in_shape, num_classes: int, width: int = 16) -> Classifier:
        return _resnet(in_shape, num_classes, (n, n, n), (width, 2 * width, 4 * width))

    build.__doc__ = f"CIFAR ResNet-{depth} (He et al.): 3 stages of {n} blocks, width 16/32/64."


for _depth in (8, 20, 32, 56):
    _register_cifar_resnet(_depth)

# DiSK's ResNet10 family: 4 stages of one block; l/m/s shrink the width (64M/16M/4M MACs on
# 32x32 inputs in the paper).
_RESNET10_WIDTHS = {"l": 32, "m": 16, "s": 8}
for _size, _w in _RESNET10_WIDTHS.items():

    def _make(w: int):
        def build(in_shape, num_classes: int, width: int = w) -> Classifier:
            return _resnet(
                in_shape, num_classes, (1, 1, 1, 1), (width, 2 * width, 4 * width, 8 * width)
            )

        return build

    ARCHITECTURES.register(f"resnet10_{_size}")(_make(_w))


def build(name: str, in_shape, num_classes: int, **kwargs) -> Classifier:
    return ARCHITECTURES.get(name)(tuple(in_shape), num_classes, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, in_shape) -> int:
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
