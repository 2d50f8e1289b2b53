"""cascade-train as users run it: subprocesses on the bundled digits, tiny epochs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cascade_server.bundle import Bundle
from cascade_server.train.methods import METHODS
from cascade_server.triton import read_model_config

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "digits" / "kd.yaml"
QUICK = ["--set", "teacher.epochs=3", "--set", "fit.epochs=4"]


def train(
    *args: str, check: bool = True, module: str = "cascade_server.train.cli", launcher: tuple = ()
) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, *launcher, "-m", module, "--no-progress", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    done = train(
        "run",
        CONFIG,
        "--run-dir",
        root / "kd",
        *QUICK,
        "--export",
        "--bundles",
        root / "bundles",
        "--repository",
        root / "repo",
    )
    return root, json.loads(done.stdout)


def test_run_records_everything_and_exports_what_the_gateway_loads(kd_run):
    root, summary = kd_run
    assert summary["teacher_accuracy"] > 0.5 and summary["student_accuracy"] > 0.2
    record = json.loads((root / "kd" / "record.json").read_text())
    assert record["seed"] == 0 and len(record["data_fingerprint"]) == 16
    assert record["student"]["method"] == "kd" and record["student"]["macs"] > 0
    assert record["evaluation"]["teacher_accuracy"] == summary["teacher_accuracy"]
    assert "teacher:" in (root / "kd" / "config.yaml").read_text()
    bundle = Bundle.load(root / "bundles" / "digits")
    assert bundle.manifest.training["data_fingerprint"] == record["data_fingerprint"]
    assert 0.0 < bundle.manifest.default_threshold < 1.0
    config = read_model_config(root / "repo" / "digits_teacher" / "config.pbtxt")
    assert config.platform == "onnxruntime_onnx" and config.dynamic_batching
    # Serving artefacts only: training weights and records stay in the run directory.
    assert sorted(p.name for p in (root / "repo" / "digits_teacher" / "1").iterdir()) == [
        "model.onnx"
    ]
    assert sorted(p.name for p in bundle.path.iterdir()) == ["manifest.json", "student.onnx"]
    assert (root / "kd" / "student.pt").is_file() and (root / "kd" / "teacher.pt").is_file()


def test_calibrate_for_a_rate_or_an_accuracy(kd_run):
    root, _ = kd_run
    out = train("calibrate", root / "kd", "--target-rate", "0.3").stdout
    assert "-> delegation 0.300" in out
    cal = json.loads((root / "kd" / "calibration.json").read_text())
    out = train(
        "calibrate", root / "kd", "--target-accuracy", f"{cal['student_accuracy']:.3f}"
    ).stdout
    assert "threshold" in out


def test_distill_another_method_and_compare_on_one_plot(kd_run):
    root, _ = kd_run
    import shutil

    shutil.copytree(root / "kd", root / "md")
    train("distill", root / "md", "--method", "md", "--param", "rho_train=0.5")
    written = (root / "md" / "config.yaml").read_text()
    # Another method starts from its own defaults: kd's knobs are not carried over.
    assert "name: md" in written and "rho_train: 0.5" in written and "temperature" not in written
    train("calibrate", root / "md")
    out = train("evaluate", root / "kd", root / "md", "--out", root / "eval").stdout
    assert "(kd)" in out and "(md)" in out
    curves = json.loads((root / "eval" / "curves.json").read_text())
    assert len(curves) == 2
    assert (root / "eval" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_onnx_teacher_import_with_online_kdplus(demo, tmp_path):
    onnx = demo.repository / "digits_teacher" / "1" / "model.onnx"
    train("teacher", CONFIG, "--run-dir", tmp_path / "run", "--onnx", onnx, *QUICK)
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["teacher"]["source"] == "onnx" and record["teacher"]["test_accuracy"] > 0.9
    train("distill", tmp_path / "run", "--method", "kdplus", "--set", "fit.epochs=2")
    train("export", tmp_path / "run", "--bundles", tmp_path / "b", "--repository", tmp_path / "r")
    exported = (tmp_path / "r" / "digits_teacher" / "1" / "model.onnx").read_bytes()
    assert exported == onnx.read_bytes()


def test_bad_method_parameters_fail_with_the_valid_ones(kd_run):
    root, _ = kd_run
    done = train("distill", root / "kd", "--param", "temprature=2", check=False)
    assert done.returncode == 2 and "it takes: ['a', 'b', 'temperature']" in done.stderr
    assert "Traceback" not in done.stderr  # one clear line, not a stack
    done = train("distill", root / "kd", "--method", "nope", check=False)
    assert done.returncode == 2 and "'nope' is not one of" in done.stderr


def test_help_everywhere_and_the_method_list():
    out = train("methods").stdout
    for name in METHODS.names():
        assert f"\n{name} " in f"\n{out}"
    for command in ("run", "teacher", "distill", "calibrate", "evaluate", "export", "demo"):
        assert "usage: cascade-train" in train(command, "--help").stdout.lower()


def test_two_process_distributed_training_with_torchrun(tmp_path):
    """DistributedDataParallel on CPU (gloo), 2 processes, as `torchrun` launches them."""
    done = train(
        "run",
        CONFIG,
        "--run-dir",
        tmp_path / "ddp",
        "--set",
        "teacher.epochs=2",
        "--set",
        "fit.epochs=3",
        launcher=("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
    )
    assert "destroy_process_group" not in done.stderr  # the group is left cleanly
    record = json.loads((tmp_path / "ddp" / "record.json").read_text())
    assert record["world_size"] == 2
    assert record["teacher"]["test_accuracy"] > 0.3
    assert np.isfinite(record["student"]["loss_history"]).all()
    assert record["student"]["loss_history"][-1] < record["student"]["loss_history"][0]


def test_bdistil_bundle_carries_its_stages_and_serves(tmp_path):
    import onnxruntime as ort
    from fastapi.testclient import TestClient

    from cascade_server.gateway.app import create_app
    from cascade_server.settings import Settings

    from ..conftest import b64, png_bytes
    from .conftest import FakeTeacher

    train(
        "run",
        ROOT / "configs" / "digits" / "bdistil.yaml",
        "--run-dir",
        tmp_path / "run",
        *QUICK,
        "--set",
        "export.anytime=graph",  # one graph, every stage an output (tiers: test_anytime.py)
        "--export",
        "--bundles",
        tmp_path / "b",
        "--repository",
        tmp_path / "r",
    )
    bundle = Bundle.load(tmp_path / "b" / "digits")
    stages = bundle.manifest.stages
    assert [s.output for s in stages] == ["stage_1", "stage_2", "stage_3"]
    assert all(0.0 <= s.threshold <= 1.0 for s in stages)
    session = ort.InferenceSession(str(bundle.student_path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "stage_1", "stage_2", "stage_3"]
    outs = session.run(None, {"input": np.zeros((2, 1, 8, 8), np.float32)})
    np.testing.assert_allclose(outs[0], outs[3], atol=1e-6)  # logits = the last stage
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert len(record["evaluation"]["stage_accuracy"]) == 3

    app = create_app(
        Settings(bundles=[bundle.path], state_dir=tmp_path / "s"),
        teacher_factory=lambda s, b: FakeTeacher(),
    )
    with TestClient(app) as client:
        image = np.full((8, 8, 1), 128, np.uint8)
        r = client.post("/predict", json={"image": b64(png_bytes(image))})
    assert r.status_code == 200 and r.json()["versions"]["student"] == bundle.manifest.version


def test_onnx_text_teacher_import(text_demo, tmp_path):
    onnx = text_demo.repository / "intents_teacher" / "1" / "model.onnx"
    config = ROOT / "configs" / "intents" / "kd.yaml"
    train(
        "teacher",
        config,
        "--run-dir",
        tmp_path / "run",
        "--onnx",
        onnx,
        "--set",
        "fit.epochs=3",
        "--set",
        "data.params.n=600",
        "--set",
        f"text.tokenizer={text_demo.bundle / 'tokenizer.json'}",
    )
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    # The imported teacher reads (input_ids, attention_mask) through ONNX Runtime.
    assert record["teacher"]["source"] == "onnx" and record["teacher"]["test_accuracy"] > 0.5
    train("distill", tmp_path / "run", "--method", "md")
    train("export", tmp_path / "run", "--bundles", tmp_path / "b", "--repository", tmp_path / "r")
    bundle = Bundle.load(tmp_path / "b" / "intents")
    assert bundle.manifest.modality == "text" and (bundle.path / "tokenizer.json").is_file()
    config_pb = read_model_config(tmp_path / "r" / "intents_teacher" / "config.pbtxt")
    assert [i.name for i in config_pb.input] == ["input_ids", "attention_mask"]
