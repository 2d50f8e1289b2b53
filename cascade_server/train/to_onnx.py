"""PyTorch -> ONNX for serving: a dynamic batch axis, the serving input contract (images:
`input`; texts: `input_ids` + `attention_mask`), checked against PyTorch with ONNX Runtime."""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn


class TextExport(nn.Module):
    """Text models in the serving contract: (input_ids, attention_mask) -> logits. Masked
    positions become padding (id 0), which is what the models treat as absent."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.model(input_ids * attention_mask)


class TextExportWithPrev(TextExport):
    """A text tier that also takes the previous stage's logits (one further float input)."""

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prev: torch.Tensor
    ):
        return self.model(input_ids * attention_mask, prev)


def _examples(in_shape, modality: str, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    if modality == "text":
        vocab, length = in_shape
        ids = torch.randint(1, vocab, (batch, length), generator=gen)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[:, length // 2 + seed % 3 :] = 0
        return ids * mask, mask
    return (torch.randn(batch, *in_shape, generator=gen),)


def export_onnx(
    model: nn.Module,
    in_shape: tuple[int, ...],
    path: Path,
    *,
    modality: str = "image",
    input_name: str = "input",
    output_name: str | list[str] = "logits",
    extra_inputs: Sequence[tuple[str, int]] = (),
    check_atol: float = 1e-4,
) -> Path:
    """ONNX with a dynamic batch axis, checked against PyTorch with ONNX Runtime. A model that
    returns a tuple gets one output per element (`output_name` a list). Text models take
    `input_ids` and `attention_mask` (int64, batch x max_length). `extra_inputs`: further
    float32 (batch, width) inputs after those, by name and width (a tier's previous logits)."""
    import onnx
    import onnxruntime as ort

    from ..bundle import TEXT_INPUTS

    names = [output_name] if isinstance(output_name, str) else list(output_name)
    # A copy: the caller's model may live on a GPU and keep training or serving there.
    model = copy.deepcopy(model).cpu().eval()
    if modality == "text" and len(extra_inputs) > 1:
        raise ValueError("a text graph takes at most one input besides the tokens")
    wrapped = (
        (TextExportWithPrev(model) if extra_inputs else TextExport(model))
        if modality == "text"
        else model
    )
    inputs = [
        *(TEXT_INPUTS if modality == "text" else (input_name,)),
        *(n for n, _ in extra_inputs),
    ]

    def examples(batch: int, seed: int) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(seed + 1000)
        extra = tuple(torch.randn(batch, width, generator=gen) for _, width in extra_inputs)
        return (*_examples(in_shape, modality, batch, seed), *extra)

    batch = torch.export.Dim("batch", min=1, max=4096)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():
            # The exporter's internal deprecation chatter is not actionable for users; the
            # result is checked against PyTorch below.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", UserWarning)
            torch.onnx.export(
                wrapped,
                examples(2, 0),
                str(raw),
                input_names=inputs,
                output_names=names,
                dynamic_shapes=tuple({0: batch} for _ in inputs),
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        proto = onnx.load(str(raw))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        example = examples(n, n)
        with torch.no_grad():
            expected = wrapped(*example)
        expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
        got = session.run(names, {k: v.numpy() for k, v in zip(inputs, example, strict=True)})
        for name, e, g in zip(names, expected, got, strict=True):
            if not np.allclose(g, e.numpy(), atol=check_atol):
                raise RuntimeError(f"ONNX export of {path.name} ({name}) disagrees with PyTorch")
    return path
