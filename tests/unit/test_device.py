"""The device helper's contract, and the places that used to put CPU batches into a model on
another device, checked on PyTorch's `meta` device (shapes only, no data: no GPU needed)."""

import numpy as np
import torch

from cascade_server.train.device import chunked, device_of, to_device
from cascade_server.train.models import build, count_macs


def test_to_device_moves_numpy_and_tensors_and_device_of_follows_the_model():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert to_device(x, "cpu").device.type == "cpu"
    assert to_device(x, torch.device("meta")).device.type == "meta"
    assert to_device(torch.ones(2), "meta").device.type == "meta"
    model = build("mlp", (1, 8, 8), 10, hidden=(4,))
    assert device_of(model).type == "cpu"
    assert device_of(model.to("meta")).type == "meta"
    assert device_of(torch.nn.ReLU()).type == "cpu"


def test_chunked_equals_one_pass_and_returns_numpy():
    model = build("mlp", (1, 8, 8), 10, hidden=(4,)).eval()
    x = np.random.default_rng(0).normal(size=(1100, 1, 8, 8)).astype(np.float32)
    out = chunked(model, x, "cpu", batch_size=512)
    with torch.no_grad():
        whole = model(torch.from_numpy(x)).numpy()
    assert isinstance(out, np.ndarray) and out.shape == (1100, 10)
    np.testing.assert_allclose(out, whole, atol=1e-5)


def test_count_macs_runs_where_the_model_is():
    """Used to build its example input on the CPU whatever the model's device (the CUDA crash)."""
    model = build("cnn", (1, 8, 8), 10, width=8)
    on_cpu = count_macs(model, (1, 8, 8))
    assert count_macs(model.to("meta"), (1, 8, 8)) == on_cpu > 0


def test_an_onnx_teacher_follows_the_run_device_where_onnxruntime_can(
    tmp_path, monkeypatch, caplog
):
    """device=cuda: the CUDA provider first when this onnxruntime has one (onnxruntime-gpu), else
    the CPU with a warning; device=cpu never asks for CUDA."""
    import onnxruntime as ort

    from cascade_server.train.teachers import OnnxTeacher
    from cascade_server.train.to_onnx import export_onnx

    path = export_onnx(build("mlp", (1, 4, 4), 3, hidden=(4,)), (1, 4, 4), tmp_path / "t.onnx")
    assert OnnxTeacher(path, device="cpu").providers == ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with caplog.at_level("WARNING"):
            teacher = OnnxTeacher(path, device="cuda")
        assert teacher.providers == ["CPUExecutionProvider"]
        assert "no CUDA provider" in caplog.text
    asked = []
    real = ort.InferenceSession

    def session(p, opts, providers):
        asked.append(list(providers))
        return real(p, opts, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ort, "InferenceSession", session)
    OnnxTeacher(path, device="cuda")
    assert asked == [["CUDAExecutionProvider", "CPUExecutionProvider"]]
    x = np.zeros((2, 1, 4, 4), np.float32)
    assert OnnxTeacher(path, device="cuda").logits(x).shape == (2, 3)
