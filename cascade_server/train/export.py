"""Export: the ONNX student bundle for the gateway and the teacher's Triton repository entry."""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


class TextExport(nn.Module):
    """Text models in the serving contract: (input_ids, attention_mask) -> logits. Masked
    positions become padding (id 0), which is what the models treat as absent."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return self.model(input_ids * attention_mask)


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
    check_atol: float = 1e-4,
) -> Path:
    """ONNX with a dynamic batch axis, checked against PyTorch with ONNX Runtime. A model that
    returns a tuple gets one output per element (`output_name` a list). Text models take
    `input_ids` and `attention_mask` (int64, batch x max_length)."""
    import onnx
    import onnxruntime as ort

    from ..bundle import TEXT_INPUTS

    names = [output_name] if isinstance(output_name, str) else list(output_name)
    model = model.cpu().eval()
    wrapped = TextExport(model) if modality == "text" else model
    inputs = list(TEXT_INPUTS) if modality == "text" else [input_name]
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
                _examples(in_shape, modality, 2, 0),
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
        example = _examples(in_shape, modality, n, n)
        with torch.no_grad():
            expected = wrapped(*example)
        expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
        got = session.run(names, {k: v.numpy() for k, v in zip(inputs, example, strict=True)})
        for name, e, g in zip(names, expected, got, strict=True):
            if not np.allclose(g, e.numpy(), atol=check_atol):
                raise RuntimeError(f"ONNX export of {path.name} ({name}) disagrees with PyTorch")
    return path


def teacher_config(
    name: str,
    in_shape: tuple[int, ...],
    num_classes: int,
    *,
    max_batch_size: int = 64,
    input_name: str = "input",
    output_name: str = "logits",
    instances: int = 1,
    max_queue_delay_us: int = 100,
    default_timeout_us: int = 5_000_000,
    modality: str = "image",
    text_inputs: tuple[str, str] = ("input_ids", "attention_mask"),
):
    """The production Triton config: ONNX Runtime platform, dynamic batching, GPU instances.
    (The bundled CPU server derives a Python-backend twin from it; see cascade_server.triton.)"""
    from tritonclient.grpc import model_config_pb2 as mc

    if modality == "text":  # token ids and attention mask, int64, padded to max_length
        tensors = [(n, mc.TYPE_INT64, [in_shape[1]]) for n in text_inputs]
    else:
        tensors = [(input_name, mc.TYPE_FP32, list(in_shape))]
    config = mc.ModelConfig(
        name=name,
        platform="onnxruntime_onnx",
        max_batch_size=max_batch_size,
        input=[mc.ModelInput(name=n, data_type=t, dims=d) for n, t, d in tensors],
        output=[mc.ModelOutput(name=output_name, data_type=mc.TYPE_FP32, dims=[num_classes])],
        instance_group=[
            mc.ModelInstanceGroup(count=instances, kind=mc.ModelInstanceGroup.KIND_GPU)
        ],
        # A short queue delay: the teacher hop is latency-sensitive, and requests still batch
        # under load (a 2 ms delay was measured to add ~2.6 ms to every lone request).
        dynamic_batching=mc.ModelDynamicBatching(
            max_queue_delay_microseconds=max_queue_delay_us,
            preferred_batch_size=[s for s in (8, 16, 32) if s <= max_batch_size],
            # The gateway sends its deadline as the request timeout; a request still queued
            # past it is rejected rather than computed for nobody. The default bounds requests
            # from clients that send none.
            default_queue_policy=mc.ModelQueuePolicy(
                timeout_action=mc.ModelQueuePolicy.REJECT,
                default_timeout_microseconds=default_timeout_us,
                allow_timeout_override=True,
            ),
        ),
        # Triton runs this before reporting ready, so the first real request does not pay for
        # lazy initialisation (tens of ms measured on the first call without it).
        model_warmup=[
            mc.ModelWarmup(
                name="zeros",
                batch_size=1,
                inputs={
                    n: mc.ModelWarmup.Input(data_type=t, dims=d, zero_data=True)
                    for n, t, d in tensors
                },
            )
        ],
    )
    return config


def write_teacher_entry(
    repository: Path,
    name: str,
    model: nn.Module,
    in_shape: tuple[int, ...],
    num_classes: int,
    *,
    version: int = 1,
    max_batch_size: int = 64,
    modality: str = "image",
) -> Path:
    from ..triton import write_model_config

    entry = repository / name
    export_onnx(model, in_shape, entry / str(version) / "model.onnx", modality=modality)
    config = teacher_config(
        name, in_shape, num_classes, max_batch_size=max_batch_size, modality=modality
    )
    write_model_config(config, entry / "config.pbtxt")
    return entry


def save_weights(model: nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Tensors only: `weights_only=True` refuses pickled code."""
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
