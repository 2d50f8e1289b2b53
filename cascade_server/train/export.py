"""Export: the ONNX student bundle for the gateway and the teacher's Triton repository entry."""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..bundle import Bundle, Manifest

log = logging.getLogger(__name__)


def export_onnx(
    model: nn.Module,
    in_shape: tuple[int, ...],
    path: Path,
    *,
    input_name: str = "input",
    output_name: str | list[str] = "logits",
    check_atol: float = 1e-4,
) -> Path:
    """ONNX with a dynamic batch axis, checked against PyTorch with ONNX Runtime. A model that
    returns a tuple gets one output per element (`output_name` a list)."""
    import onnx
    import onnxruntime as ort

    names = [output_name] if isinstance(output_name, str) else list(output_name)
    model = model.cpu().eval()
    example = torch.randn(2, *in_shape, generator=torch.Generator().manual_seed(0))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "model.onnx"
        with warnings.catch_warnings():
            # The exporter's internal deprecation chatter is not actionable for users; the
            # result is checked against PyTorch below.
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (example,),
                str(raw),
                input_names=[input_name],
                output_names=names,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        proto = onnx.load(str(raw))
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, *in_shape, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(x)
        expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
        got = session.run(names, {input_name: x.numpy()})
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
):
    """The production Triton config: ONNX Runtime platform, dynamic batching, GPU instances.
    (The bundled CPU server derives a Python-backend twin from it; see cascade_server.triton.)"""
    from tritonclient.grpc import model_config_pb2 as mc

    config = mc.ModelConfig(
        name=name,
        platform="onnxruntime_onnx",
        max_batch_size=max_batch_size,
        input=[mc.ModelInput(name=input_name, data_type=mc.TYPE_FP32, dims=list(in_shape))],
        output=[mc.ModelOutput(name=output_name, data_type=mc.TYPE_FP32, dims=[num_classes])],
        instance_group=[
            mc.ModelInstanceGroup(count=instances, kind=mc.ModelInstanceGroup.KIND_GPU)
        ],
        # A short queue delay: the teacher hop is latency-sensitive, and requests still batch
        # under load (a 2 ms delay was measured to add ~2.6 ms to every lone request).
        dynamic_batching=mc.ModelDynamicBatching(
            max_queue_delay_microseconds=max_queue_delay_us,
            preferred_batch_size=[s for s in (8, 16, 32) if s <= max_batch_size],
        ),
        # Triton runs this before reporting ready, so the first real request does not pay for
        # lazy initialisation (tens of ms measured on the first call without it).
        model_warmup=[
            mc.ModelWarmup(
                name="zeros",
                batch_size=1,
                inputs={
                    input_name: mc.ModelWarmup.Input(
                        data_type=mc.TYPE_FP32, dims=list(in_shape), zero_data=True
                    )
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
) -> Path:
    from ..triton import write_model_config

    entry = repository / name
    export_onnx(model, in_shape, entry / str(version) / "model.onnx")
    config = teacher_config(name, in_shape, num_classes, max_batch_size=max_batch_size)
    write_model_config(config, entry / "config.pbtxt")
    return entry


def write_bundle(path: Path, model: nn.Module, manifest: Manifest) -> Bundle:
    p = manifest.preprocess
    in_shape = (p.channels, p.height, p.width)
    export_onnx(
        model,
        in_shape,
        path / manifest.student_file,
        input_name=manifest.student_input,
        output_name=manifest.student_output,
    )
    bundle = Bundle(path, manifest)
    bundle.save()
    return bundle


def save_weights(model: nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Tensors only: `weights_only=True` refuses pickled code."""
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
