"""The committed model_repository config is a valid Triton ModelConfig and is what export writes."""

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf import json_format
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import model_config_pb2 as mc

from cascade_server.train.stages import teacher_config
from cascade_server.triton import python_backend_repository, read_model_config

REPO = Path(__file__).resolve().parents[2] / "model_repository"


def test_committed_config_parses_as_a_production_model_config():
    config = read_model_config(REPO / "digits_teacher" / "config.pbtxt")
    assert config.name == "digits_teacher"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size > 0
    assert config.HasField("dynamic_batching")
    assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("input", mc.TYPE_FP32, [1, 8, 8])
    ]
    assert [(o.name, list(o.dims)) for o in config.output] == [("logits", [10])]


def test_committed_config_is_what_export_generates_for_the_demo():
    committed = read_model_config(REPO / "digits_teacher" / "config.pbtxt")
    assert committed == teacher_config("digits_teacher", (1, 8, 8), 10)


def tiny_digits_model(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A real ONNX model with the digits teacher's interface, `input` (N, 1, 8, 8) -> `logits`
    (N, 10): a flatten and one seeded linear layer, whose weight and bias it returns."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 10)).astype(np.float32)
    b = rng.normal(size=10).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "w", "b"], ["logits"]),
        ],
        "tiny_digits",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime the project supports
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return w, b


class FakeTensor:
    """The two methods of `pb_utils.Tensor` that model.py uses."""

    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


def fake_pb_utils() -> types.ModuleType:
    """What model.py imports from Triton's Python backend, enough to run it outside Triton."""
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = FakeTensor
    module.InferenceResponse = lambda output_tensors, error=None: types.SimpleNamespace(
        output_tensors=output_tensors, error=error
    )
    module.TritonError = str
    module.get_input_tensor_by_name = lambda request, name: request.get(name)
    return module


def test_python_backend_twin_runs_the_same_onnx_on_cpu(tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "m" / "1").mkdir(parents=True)
    w, b = tiny_digits_model(src / "m" / "1" / "model.onnx")
    (src / "m" / "config.pbtxt").write_text(
        (REPO / "digits_teacher" / "config.pbtxt").read_text().replace("digits_teacher", "m")
    )
    out = python_backend_repository(src, tmp_path / "out")
    config = read_model_config(out / "m" / "config.pbtxt")
    assert (config.backend, config.platform) == ("python", "")
    assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
    assert config.parameters["onnx_file"].string_value == "model.onnx"
    assert config.dynamic_batching.max_queue_delay_microseconds == 100
    assert (out / "m" / "1" / "model.onnx").resolve() == (src / "m" / "1" / "model.onnx").resolve()
    assert "TritonPythonModel" in (out / "m" / "1" / "model.py").read_text()

    # Run the derived entry as Triton's Python backend would: its model.py, its config (as the
    # JSON Triton hands over), its version directory; two requests batched into one call.
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils())
    spec = importlib.util.spec_from_file_location("twin_model", out / "m" / "1" / "model.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    twin = module.TritonPythonModel()
    twin.initialize(
        {
            "model_config": json_format.MessageToJson(config, preserving_proto_field_name=True),
            "model_repository": str(out / "m"),
            "model_version": "1",
        }
    )
    assert twin.session.get_providers() == ["CPUExecutionProvider"]
    x = np.random.default_rng(1).normal(size=(3, 1, 8, 8)).astype(np.float32)
    requests = [{"input": FakeTensor("input", x[:2])}, {"input": FakeTensor("input", x[2:])}]
    responses = twin.execute(requests)
    assert [r.error for r in responses] == [None, None]
    served = np.concatenate([r.output_tensors[0].as_numpy() for r in responses])
    assert [t.name() for r in responses for t in r.output_tensors] == ["logits", "logits"]

    source = ort.InferenceSession(
        str(src / "m" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (expected,) = source.run(["logits"], {"input": x})
    np.testing.assert_array_equal(served, expected)
    # ... and those are the model's real logits, not two identical empty answers.
    np.testing.assert_allclose(expected, x.reshape(3, 64) @ w + b, rtol=1e-5, atol=1e-5)


def test_committed_text_teacher_config_takes_token_ids_and_mask():
    config = read_model_config(REPO / "intents_teacher" / "config.pbtxt")
    assert config.platform == "onnxruntime_onnx" and config.HasField("dynamic_batching")
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("input_ids", mc.TYPE_INT64, [24]),
        ("attention_mask", mc.TYPE_INT64, [24]),
    ]
    assert [(o.name, list(o.dims)) for o in config.output] == [("logits", [8])]
    assert config == teacher_config("intents_teacher", (2000, 24), 8, modality="text")
