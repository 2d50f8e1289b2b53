"""Teachers for distillation: a PyTorch model of a registered architecture (logits and
penultimate features), or any ONNX classifier (logits through ONNX Runtime)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from .device import chunked, to_device
from .models import Classifier, build
from .records import RunDir, TeacherMeta
from .weights import load_weights, save_weights

log = logging.getLogger(__name__)


class TorchTeacher:
    kind = "torch"

    def __init__(self, model: Classifier, arch: str, kwargs: dict, device: str = "cpu") -> None:
        self.model = model.to(device).eval()
        self.arch, self.kwargs, self.device = arch, kwargs, device

    @property
    def feature_dim(self) -> int:
        return self.model.feature_dim

    @torch.no_grad()
    def torch_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(to_device(x, self.device))

    @torch.no_grad()
    def logits(self, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
        return chunked(self.torch_logits, x, self.device, batch_size).astype(np.float32)


class OnnxTeacher:
    """Any ONNX classifier with one float input (batch first) and logits as first output."""

    kind = "onnx"
    feature_dim = None

    def __init__(self, path: Path, threads: int = 0, device: str = "cpu") -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            # On the run's GPU when this onnxruntime has CUDA (onnxruntime-gpu); the CPU
            # package (what the train extra installs) answers on the CPU, said once here.
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            else:
                log.warning("ONNX teacher on the CPU: this onnxruntime has no CUDA provider")
        self.path = path
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self.providers = self.session.get_providers()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_name = self.input_names[0]
        self.output_name = self.session.get_outputs()[0].name

    def _feeds(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if np.issubdtype(x.dtype, np.integer) and len(self.input_names) == 2:
            # A text teacher: token ids, and the attention mask they imply (padding is id 0).
            return {self.input_names[0]: x, self.input_names[1]: (x != 0).astype(np.int64)}
        return {self.input_name: x}

    def logits(self, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
        out = [
            self.session.run([self.output_name], self._feeds(x[i : i + batch_size]))[0]
            for i in range(0, len(x), batch_size)
        ]
        return np.concatenate(out).astype(np.float32)

    def text_inputs(self) -> tuple[str, str] | None:
        """The (ids, mask) input names of a text teacher; None for an image teacher."""
        return (self.input_names[0], self.input_names[1]) if len(self.input_names) == 2 else None

    def torch_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Online queries (KD+ on interpolated inputs) go through ONNX Runtime too."""
        return torch.from_numpy(self.logits(x.detach().cpu().numpy())).to(x.device)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("an ONNX teacher exposes logits only; use guide_input=logits")


def save_torch_teacher(run_dir: Path, teacher: TorchTeacher, in_shape, num_classes: int) -> None:
    run = RunDir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_weights(teacher.model, run / RunDir.TEACHER_WEIGHTS)
    run.write_teacher_meta(
        TeacherMeta(
            arch=teacher.arch,
            kwargs=teacher.kwargs,
            in_shape=tuple(in_shape),
            num_classes=num_classes,
        )
    )


def load_teacher(run_dir: Path, device: str = "cpu") -> TorchTeacher | OnnxTeacher:
    """The teacher a run holds: teacher.onnx (imported) or teacher.pt + teacher.json."""
    run = RunDir(run_dir)
    if (run / RunDir.TEACHER_ONNX).is_file():
        return OnnxTeacher(run / RunDir.TEACHER_ONNX, device=device)
    if not (run / RunDir.TEACHER_META).is_file():
        raise FileNotFoundError(f"{run_dir} holds no teacher: run `cascade-train teacher` first")
    meta = run.teacher_meta()
    return load_torch_teacher(
        run / RunDir.TEACHER_WEIGHTS,
        meta.arch,
        meta.kwargs,
        meta.in_shape,
        meta.num_classes,
        device,
    )


def load_torch_teacher(
    path: Path, arch: str, kwargs: dict, in_shape, num_classes: int, device: str = "cpu"
) -> TorchTeacher:
    """A checkpoint of a registered architecture; tensors only (weights_only=True)."""
    model = build(arch, in_shape, num_classes, **kwargs)
    return TorchTeacher(load_weights(model, path), arch, kwargs, device)
