"""The student's device choice: real ONNX Runtime sessions on the CPU; the GPU cases with ORT's
session class wrapped to act as onnxruntime-gpu does on a node without a usable GPU."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from cascade_server.gateway.student import OnnxStudent, open_session

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


@pytest.fixture
def model(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["logits"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, 3])],
    )
    path = tmp_path / "student.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_cpu_and_auto_run_on_the_cpu_without_a_cuda_provider(model):
    for device in ("cpu", "auto"):
        student = OnnxStudent(model, "logits", device=device, threads=1)
        student.setup()
        x = np.array([[0.1, 0.7, 0.2]], dtype=np.float32)
        np.testing.assert_array_equal(student.predict({"x": x}), x)
        assert student._session.get_providers() == [CPU]


def test_cuda_without_a_cuda_provider_is_refused_with_the_fix(model):
    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has a CUDA provider")
    with pytest.raises(RuntimeError, match=r"cascade-server\[gpu\]"):
        open_session(model, 1, "cuda")


class _GpuOrt:
    """onnxruntime-gpu on a node without a usable GPU: the provider is listed; a session asked
    for it either raises (`raises=True`) or, as ORT's own fallback does, runs on the CPU."""

    def __init__(self, monkeypatch, *, raises: bool) -> None:
        self.asked: list[list[str]] = []
        real = ort.InferenceSession

        def session(path, options, providers):
            self.asked.append(list(providers))
            if providers[0] == CUDA and raises:
                raise RuntimeError("CUDA failure 100: no CUDA-capable device is detected")
            return real(path, options, providers=[CPU])

        monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
        monkeypatch.setattr(ort, "InferenceSession", session)
        monkeypatch.setattr(ort, "preload_dlls", lambda: None, raising=False)


@pytest.mark.parametrize("raises", [True, False])
def test_auto_falls_back_to_the_cpu_when_the_gpu_is_unusable(model, monkeypatch, raises):
    fake = _GpuOrt(monkeypatch, raises=raises)
    session = open_session(model, 1, "auto")
    assert fake.asked[0] == [CUDA, CPU]
    assert session.get_providers() == [CPU]
    assert len(fake.asked) == (2 if raises else 1)


@pytest.mark.parametrize("raises", [True, False])
def test_cuda_fails_when_the_gpu_is_unusable(model, monkeypatch, raises):
    _GpuOrt(monkeypatch, raises=raises)
    with pytest.raises(RuntimeError, match=r"CUDA|GPU"):
        open_session(model, 1, "cuda")
