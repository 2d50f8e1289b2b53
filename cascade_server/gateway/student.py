"""The student: an ONNX Runtime session, created once in `setup`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)


class Student(Protocol):
    """The student stage: input tensors by name -> logits (batch, outputs)."""

    @property
    def ready(self) -> bool: ...
    def setup(self) -> None: ...
    def close(self) -> None: ...
    def predict(self, feeds: dict[str, np.ndarray]) -> np.ndarray: ...


def session_options(threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # Explicit thread counts: ORT's default takes every core, and spinning threads steal the
    # event loop's core between requests.
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


def providers_for(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise RuntimeError(
            "CASCADE_STUDENT_DEVICE=cuda but onnxruntime has no CUDA provider "
            f"(available: {available}); install cascade-server[gpu]"
        )
    return ["CPUExecutionProvider"]


def open_session(path: Path, threads: int, device: str) -> Any:
    """An ONNX Runtime session on `device`. `auto` uses a GPU when one is usable and falls back to
    the CPU otherwise (a GPU image on a CPU node still serves); `cuda` fails instead."""
    import onnxruntime as ort

    providers = providers_for(device)
    if providers[0] == "CUDAExecutionProvider" and hasattr(ort, "preload_dlls"):
        # onnxruntime-gpu[cuda,cudnn] ships CUDA and cuDNN as pip packages: load them from there,
        # so the image needs no CUDA base (the driver comes from the node).
        try:
            ort.preload_dlls()
        except Exception as e:  # a CUDA base image provides them instead
            log.info("CUDA libraries not preloaded from pip packages: %s", e)
    try:
        session = ort.InferenceSession(str(path), session_options(threads), providers=providers)
    except Exception as e:
        if device != "auto" or providers == ["CPUExecutionProvider"]:
            raise
        log.warning("no usable GPU for the student (%s): running it on the CPU", e)
        session = ort.InferenceSession(
            str(path), session_options(threads), providers=["CPUExecutionProvider"]
        )
    active = session.get_providers()[0]
    if device == "cuda" and active != "CUDAExecutionProvider":
        # ORT itself falls back to the CPU with only a warning when the CUDA provider fails.
        raise RuntimeError(
            f"CASCADE_STUDENT_DEVICE=cuda but the student session runs on {active}: no usable "
            "GPU (driver, CUDA or cuDNN missing); use auto to allow the CPU"
        )
    if device == "auto" and active != providers[0]:
        log.warning("no usable GPU for the student: running it on %s", active)
    return session


class OnnxStudent:
    def __init__(self, path: Path, output_name: str, *, device: str, threads: int) -> None:
        self.path = path
        self.output_name = output_name
        self.device = device
        self.threads = threads
        self._session: Any = None
        self.input_names: set[str] = set()

    def setup(self) -> None:
        self._session = open_session(self.path, self.threads, self.device)
        self.input_names = {i.name for i in self._session.get_inputs()}
        log.info("student %s loaded on %s", self.path, self._session.get_providers()[0])

    @property
    def ready(self) -> bool:
        return self._session is not None

    def predict(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Input tensors by name -> logits (batch, classes). Inline on the event loop: tens of
        microseconds, cheaper than a thread hop."""
        if self._session is None:
            raise RuntimeError("student used before setup()")
        if set(feeds) != self.input_names:
            raise ValueError(
                f"{self.path} takes inputs {sorted(self.input_names)}, not {sorted(feeds)}"
            )
        (logits,) = self._session.run([self.output_name], feeds)
        return np.asarray(logits)

    def close(self) -> None:
        self._session = None
