"""Architecture registry. Builders take the input shape (C, H, W) and the class count, and
return a `Classifier`: `features(x)` (penultimate activations, read by DiSK's guide) then
`head`. Sizes are reported in parameters and MACs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Registry
from .device import device_of

ARCHITECTURES: Registry = Registry("architecture")


class Classifier(nn.Module):
    head: nn.Linear

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
def count_macs(model: nn.Module, in_shape, modality: str = "image") -> int:
    """Multiply-accumulates of one forward pass (Linear and Conv layers; embedding lookups and
    attention's matrix products are not counted)."""
    total = 0

    def hook(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):  # per output element: in_features (tokens too)
            total += output[0].numel() * module.in_features
        elif isinstance(module, nn.Conv2d | nn.Conv1d):
            k = math.prod(module.kernel_size)
            total += output[0].numel() * (module.in_channels // module.groups) * k

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Linear | nn.Conv2d | nn.Conv1d)
    ]
    was_training = model.training
    model.eval()
    try:
        model(example_input(in_shape, modality).to(device_of(model)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total


# ---------------------------------------------------------------- text
# Text models take int64 token ids (batch, length); "in_shape" is (vocab_size, max_length).
# Padding is id 0, so the attention mask is (ids != 0) unless given. Bodies split into
# `embed` (ids -> vectors) and `encode` (vectors, mask -> features) so KD+ can mix inputs in
# embedding space.


class TextBody(nn.Module):
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            mask = ids != 0
        return self.encode(self.embed(ids), mask.bool())


class TextClassifier(Classifier):
    body: TextBody

    def features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.body(x, mask)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.body(x, mask))

    def forward_embedded(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.body.encode(emb, mask.bool()))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class BagBody(TextBody):
    """fastText-style: mean of token and hashed-bigram embeddings. Embedding + masked mean
    (not nn.EmbeddingBag, which exports to ONNX as a Loop 10-15x slower)."""

    def __init__(self, vocab: int, dim: int, buckets: int, hidden: int) -> None:
        super().__init__()
        self.vocab, self.buckets = vocab, buckets
        self.emb = nn.Embedding(vocab + buckets, dim, padding_idx=0)
        self.proj = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU()) if hidden else nn.Identity()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        tokens = self.emb(ids)
        if not self.buckets:
            return tokens
        # Bigram (a, b) hashed into `buckets` extra rows; computed in the graph from the ids.
        bigram = (ids[:, :-1] * 1000003 + ids[:, 1:]) % self.buckets + self.vocab
        bigrams = self.emb(bigram)
        valid = ((ids[:, :-1] != 0) & (ids[:, 1:] != 0)).unsqueeze(-1).to(tokens.dtype)
        bigrams = torch.cat([bigrams * valid, torch.zeros_like(tokens[:, :1])], dim=1)
        return tokens + bigrams

    def encode(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.proj(_masked_mean(emb, mask))


@ARCHITECTURES.register("bag")
def bag(in_shape, num_classes: int, dim: int = 64, buckets: int = 4096, hidden: int = 0):
    vocab = in_shape[0]
    body = BagBody(vocab, dim, buckets, hidden)
    return TextClassifier(body, nn.Linear(hidden or dim, num_classes))


class ConvBody(TextBody):
    def __init__(self, vocab: int, dim: int, channels: int, kernels: tuple[int, ...]) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.convs = nn.ModuleList(nn.Conv1d(dim, channels, k, padding=k // 2) for k in kernels)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids)

    def encode(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = (emb * mask.unsqueeze(-1).to(emb.dtype)).transpose(1, 2)
        length = x.shape[-1]
        pooled = []
        for conv in self.convs:
            h = F.relu(conv(x))[..., :length]
            h = h.masked_fill(~mask.unsqueeze(1), -1e4)
            pooled.append(h.max(dim=-1).values)
        return torch.cat(pooled, dim=1)


@ARCHITECTURES.register("textcnn")
def textcnn(
    in_shape,
    num_classes: int,
    dim: int = 64,
    channels: int = 32,
    kernels: tuple[int, ...] | list[int] = (3, 5),
) -> TextClassifier:
    """A small 1-D CNN over token embeddings, max-pooled over time."""
    body = ConvBody(in_shape[0], dim, channels, tuple(kernels))
    return TextClassifier(body, nn.Linear(channels * len(kernels), num_classes))


class EncoderLayer(nn.Module):
    """Pre-norm Transformer encoder layer from plain ops (exports to ONNX cleanly; PyTorch's
    fused fast path does not)."""

    def __init__(self, dim: int, heads: int, ff: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff), nn.GELU(), nn.Linear(ff, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        scores = scores.masked_fill(~mask[:, None, None, :], -1e4)
        attn = self.drop(scores.softmax(-1)) @ v
        x = x + self.drop(self.out(attn.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.ff(self.norm2(x)))


class TransformerBody(TextBody):
    def __init__(
        self, vocab: int, max_len: int, dim: int, heads: int, layers: int, ff: int, dropout: float
    ) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.pos = nn.Parameter(torch.zeros(1, max_len, dim))
        nn.init.normal_(self.pos, std=0.02)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, ff, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.emb(ids) + self.pos[:, : ids.shape[1]]

    def encode(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = emb
        for layer in self.layers:
            x = layer(x, mask)
        return _masked_mean(self.norm(x), mask)


@ARCHITECTURES.register("transformer")
def transformer(
    in_shape,
    num_classes: int,
    dim: int = 64,
    heads: int = 4,
    layers: int = 2,
    ff: int = 128,
    dropout: float = 0.1,
) -> TextClassifier:
    """A small Transformer encoder (trained from scratch here), mean-pooled."""
    vocab, max_len = in_shape
    body = TransformerBody(vocab, max_len, dim, heads, layers, ff, dropout)
    return TextClassifier(body, nn.Linear(dim, num_classes))


def example_input(in_shape, modality: str = "image") -> torch.Tensor:
    """A batch-of-one input for shape probes (MACs, export)."""
    if modality == "text":
        return torch.ones(1, in_shape[1], dtype=torch.long)
    return torch.zeros(1, *in_shape)
