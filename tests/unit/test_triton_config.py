"""The committed model_repository config is a valid Triton ModelConfig and is what export writes."""

from pathlib import Path

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


def test_python_backend_twin_runs_the_same_onnx_on_cpu(tmp_path):
    src = tmp_path / "src"
    (src / "m" / "1").mkdir(parents=True)
    (src / "m" / "1" / "model.onnx").write_bytes(b"onnx")
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


def test_committed_text_teacher_config_takes_token_ids_and_mask():
    config = read_model_config(REPO / "intents_teacher" / "config.pbtxt")
    assert config.platform == "onnxruntime_onnx" and config.HasField("dynamic_batching")
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("input_ids", mc.TYPE_INT64, [24]),
        ("attention_mask", mc.TYPE_INT64, [24]),
    ]
    assert [(o.name, list(o.dims)) for o in config.output] == [("logits", [8])]
    assert config == teacher_config("intents_teacher", (2000, 24), 8, modality="text")
