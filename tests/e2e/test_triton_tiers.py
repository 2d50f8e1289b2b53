"""Tiers on Triton: the demo's MLP student, its CNN teacher's graph served a second time by the
real tritonserver as a tier ("cnn", `runtime: triton`), and the teacher last. The gateway runs
in-process (real ONNX Runtime student, real gRPC to both Triton models); who should answer is
worked out from the stages' own graphs outside the gateway."""

from __future__ import annotations

import shutil

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from cascade_server.bundle import TierRef
from cascade_server.gateway.app import create_app
from cascade_server.policy import softmax, top2_margin
from cascade_server.preprocess import normalize
from cascade_server.settings import Settings
from cascade_server.train.demo import DEMO_TEACHER
from cascade_server.triton import (
    TritonServer,
    python_backend_repository,
    read_model_config,
    write_model_config,
)

from ..conftest import b64, png_bytes, triton_tier_bundle
from ..integration.test_predict import metric, metric_in
from .conftest import AUTH, TOKEN

TIER_MODEL = "digits_tier"
STUDENT_THRESHOLD = 0.9  # set through the admin API: many items leave the student


@pytest.fixture(scope="module")
def tier_triton(demo, tmp_path_factory):
    """A tritonserver with the demo's teacher and the same graph again as `digits_tier`."""
    work = tmp_path_factory.mktemp("tier-triton")
    source = work / "source"
    shutil.copytree(demo.repository / DEMO_TEACHER, source / DEMO_TEACHER)
    shutil.copytree(demo.repository / DEMO_TEACHER, source / TIER_MODEL)
    config = read_model_config(source / TIER_MODEL / "config.pbtxt")
    config.name = TIER_MODEL
    write_model_config(config, source / TIER_MODEL / "config.pbtxt")
    server = TritonServer(python_backend_repository(source, work / "repository"), work)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _offline(demo, bundle, idx):
    """(the student's margins, the CNN's probabilities and margins) outside the gateway."""
    x = normalize(demo.images[idx], bundle.manifest.preprocess)
    out = {}
    for name, path, output in [
        ("student", bundle.student_path, bundle.manifest.student_output),
        ("cnn", demo.repository / DEMO_TEACHER / "1" / "model.onnx", "logits"),
    ]:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (out[name],) = session.run([output], {session.get_inputs()[0].name: x})
    cnn_p = softmax(out["cnn"])
    return top2_margin(softmax(out["student"])), cnn_p, top2_margin(cnn_p)


@pytest.fixture(scope="module")
def tier_threshold(demo):
    """The CNN's median margin on what the student leaves unsure: about half stop at the tier."""
    from cascade_server.bundle import Bundle

    bundle = Bundle.load(demo.bundle)
    student_m, _, cnn_m = _offline(demo, bundle, np.arange(len(demo.images)))
    return float(np.median(cnn_m[student_m < STUDENT_THRESHOLD]))


@pytest.fixture(scope="module")
def bundle(demo, tier_threshold, tmp_path_factory):
    root = tmp_path_factory.mktemp("tt")
    return triton_tier_bundle(demo, root, TIER_MODEL, tier_threshold, "digits-tt")


def _client(tier_triton, bundle_path, tmp_path, **extra):
    settings = Settings(
        bundles=[bundle_path],
        state_dir=tmp_path / "state",
        admin_token=TOKEN,
        triton_url=tier_triton.grpc_url,
        teacher_timeout_s=5.0,
        overrides={"enabled": True, "allow_always": True},
        **extra,
    )
    return TestClient(create_app(settings), raise_server_exceptions=False)


@pytest.fixture
def served(tier_triton, bundle, tmp_path):
    with _client(tier_triton, bundle.path, tmp_path) as client:
        r = client.put("/admin/threshold", json={"threshold": STUDENT_THRESHOLD}, headers=AUTH)
        assert r.status_code == 200, r.text
        yield client


def _expected(demo, bundle, tier_threshold, idx):
    student_m, cnn_p, cnn_m = _offline(demo, bundle, np.asarray(idx))
    who = np.where(
        student_m >= STUDENT_THRESHOLD,
        "student",
        np.where(cnn_m >= tier_threshold, "cnn", "teacher"),
    )
    # Triton's ORT and this one may differ in the last bits: items on a threshold are left out.
    clear = (np.abs(student_m - STUDENT_THRESHOLD) > 1e-4) & (np.abs(cnn_m - tier_threshold) > 1e-4)
    return who, cnn_p, clear


def _mix(demo, bundle, tier_threshold, n=12):
    who, _, clear = _expected(demo, bundle, tier_threshold, np.arange(len(demo.images)))
    groups = [np.flatnonzero((who == w) & clear)[:n] for w in ("student", "cnn", "teacher")]
    assert all(len(g) >= 3 for g in groups), "the demo data needs all three stages"
    return sorted(int(i) for g in groups for i in g)


def _inputs(demo, idx) -> dict:
    return {"inputs": [{"image": b64(png_bytes(demo.images[i]))} for i in idx]}


def test_each_stage_answers_what_the_one_before_left_unsure(served, demo, bundle, tier_threshold):
    idx = _mix(demo, bundle, tier_threshold)
    who, cnn_p, _ = _expected(demo, bundle, tier_threshold, idx)
    r = served.post("/predict", json=_inputs(demo, idx))
    assert r.status_code == 200, r.text
    answers = r.json()["outputs"]
    assert [a["answered_by"] for a in answers] == who.tolist()  # in request order
    for a, w, p in zip(answers, who, cnn_p, strict=True):
        if w != "student":  # the tier and the teacher are the same graph: the CNN's answer
            assert a["class_id"] == int(p.argmax())
            assert a["top_k"][0]["probability"] == pytest.approx(p.max(), abs=1e-4)
        assert a["outcome"] == {"student": "confident", "cnn": "confident"}.get(w, "delegated")
        assert not a["degraded"]
    # The tier got every row the student left unsure, the teacher only what the tier left.
    n_tier = int((who != "student").sum())
    assert metric(served, "cascade_compute_units_total", tier="cnn") == pytest.approx(0.5 * n_tier)
    assert metric(served, "cascade_batch_size_sum", model="cnn") == n_tier
    assert metric(served, "cascade_batch_size_sum", model="teacher") == int(
        (who == "teacher").sum()
    )
    for stage in ("student", "cnn", "teacher"):
        got = metric(served, "cascade_stage_items_total", stage=stage)
        assert got == int((who == stage).sum()), stage
    circuit = metric_in(served.get("/metrics").text, "cascade_tier_circuit_state", tier="cnn")
    assert circuit == 0 and "cascade_tier_circuit_state{" in served.get("/metrics").text
    ready = served.get("/readyz").json()
    assert ready["cascades"]["digits"]["tier:cnn"] is True


def test_delegate_always_reaches_the_teacher_past_a_sure_tier(served, demo, bundle, tier_threshold):
    idx = _mix(demo, bundle, tier_threshold)
    who, _, _ = _expected(demo, bundle, tier_threshold, idx)
    sure_tier = [i for i, w in zip(idx, who, strict=True) if w == "cnn"][:3]
    tier_rows = metric(served, "cascade_batch_size_sum", model="cnn")
    r = served.post("/predict", json={**_inputs(demo, sure_tier), "delegate": "always"})
    assert r.status_code == 200, r.text
    assert [a["answered_by"] for a in r.json()["outputs"]] == ["teacher"] * len(sure_tier)
    assert {a["outcome"] for a in r.json()["outputs"]} == {"forced_teacher"}
    # Straight to the teacher: the tier never saw them.
    assert metric(served, "cascade_batch_size_sum", model="cnn") == tier_rows


def test_a_tier_missing_on_triton_degrades_its_items_and_is_not_ready(
    tier_triton, demo, bundle, tier_threshold, tmp_path
):
    broken = triton_tier_bundle(demo, tmp_path, "no_such_model", tier_threshold, "digits-tt-gone")
    with _client(tier_triton, broken.path, tmp_path) as client:
        client.put("/admin/threshold", json={"threshold": STUDENT_THRESHOLD}, headers=AUTH)
        assert client.get("/readyz").status_code == 503
        body = client.get("/readyz").json()["cascades"]["digits"]
        assert body["tier:cnn"] is False and body["teacher"] is True
        assert client.get("/readyz?teacher=optional").status_code == 200
        idx = _mix(demo, bundle, tier_threshold)
        who, _, _ = _expected(demo, bundle, tier_threshold, idx)
        r = client.post("/predict", json=_inputs(demo, idx))
        assert r.status_code == 200, r.text
        for a, w in zip(r.json()["outputs"], who, strict=True):
            assert a["answered_by"] == "student"  # nothing past the tier that failed
            if w != "student":
                assert a["degraded"] and a["outcome"] in ("teacher_failed", "circuit_open")
        assert metric(client, "cascade_tier_errors_total", tier="cnn") >= 1
        assert metric(client, "cascade_batch_size_count", model="teacher") == 0


def test_delegate_always_reaches_the_teacher_while_the_tiers_circuit_is_open(
    tier_triton, demo, bundle, tier_threshold, tmp_path
):
    """`delegate: always` is routed against the teacher's own room, not the first tier's: a
    tier whose circuit is open (its model is missing on Triton) does not turn it away."""
    broken = triton_tier_bundle(demo, tmp_path, "no_such_model", tier_threshold, "digits-tt-open")
    with _client(tier_triton, broken.path, tmp_path, teacher_breaker={"failures": 1}) as c:
        c.put("/admin/threshold", json={"threshold": STUDENT_THRESHOLD}, headers=AUTH)
        idx = _mix(demo, bundle, tier_threshold)
        c.post("/predict", json=_inputs(demo, idx))  # the tier fails: its circuit opens
        text = c.get("/metrics").text
        assert metric_in(text, "cascade_tier_circuit_state", tier="cnn") == 2  # open
        r = c.post("/predict", json={**_inputs(demo, idx[:4]), "delegate": "always"})
        assert r.status_code == 200, r.text
        outputs = r.json()["outputs"]
        assert [a["answered_by"] for a in outputs] == ["teacher"] * 4
        assert {a["outcome"] for a in outputs} == {"forced_teacher"}
        assert not any(a["degraded"] for a in outputs)


def test_a_swap_to_a_bundle_with_a_triton_tier_sets_the_tier_up(
    tier_triton, demo, bundle, tier_threshold, tmp_path
):
    with _client(tier_triton, demo.bundle, tmp_path) as client:
        idx = _mix(demo, bundle, tier_threshold)
        before = client.post("/predict", json=_inputs(demo, idx)).json()["outputs"]
        assert {a["answered_by"] for a in before} <= {"student", "teacher"}
        r = client.put("/admin/student", json={"bundle": str(bundle.path)}, headers=AUTH)
        assert r.status_code == 200, r.text
        client.put("/admin/threshold", json={"threshold": STUDENT_THRESHOLD}, headers=AUTH)
        who, _, _ = _expected(demo, bundle, tier_threshold, idx)
        after = client.post("/predict", json=_inputs(demo, idx)).json()["outputs"]
        assert [a["answered_by"] for a in after] == who.tolist()


def test_an_onnx_tier_after_a_triton_tier_is_refused(tier_triton, demo, bundle, tmp_path):
    from cascade_server.bundle import Bundle

    path = tmp_path / "mixed"
    shutil.copytree(bundle.path, path)
    shutil.copyfile(demo.repository / DEMO_TEACHER / "1" / "model.onnx", path / "cnn.onnx")
    mixed = Bundle.load(path)
    local = TierRef(name="local", file="cnn.onnx", threshold=0.5, cost=0.5)
    manifest = mixed.manifest.model_copy(
        update={"tiers": (*mixed.manifest.tiers, local), "version": "mixed"}
    )
    Bundle(path, type(manifest).model_validate(manifest.model_dump())).save()
    with _client(tier_triton, demo.bundle, tmp_path) as client:
        r = client.put("/admin/student", json={"bundle": str(path)}, headers=AUTH)
        assert r.status_code == 422
        message = r.json()["error"]["message"]
        assert "every onnx tier must come before the tiers on Triton" in message
