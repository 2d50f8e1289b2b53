import time

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from cascade_server.bundle import Bundle
from cascade_server.policy import softmax
from cascade_server.preprocess import normalize
from cascade_server.train.models import build
from cascade_server.train.weights import load_weights

from ..conftest import b64, easy_and_hard, png_bytes

FIELDS = {
    "label",
    "class_id",
    "top_k",
    "margin",
    "threshold",
    "delegated",
    "answered_by",
    "outcome",
    "degraded",
    "cascade",
    "versions",
    "timings_ms",
}


def metric_in(text: str, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`, in a Prometheus scrape."""
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def metric(client, name: str, **labels) -> float:
    return metric_in(client.get("/metrics").text, name, **labels)


def test_one_image_as_base64_json(gateway, demo):
    with gateway() as (client, _):
        r = client.post("/predict", json={"image": b64(png_bytes(demo.images[0]))})
    assert r.status_code == 200, r.text
    body = r.json()
    assert FIELDS <= body.keys()
    assert body["label"] == "0" and body["class_id"] == 0
    assert len(body["top_k"]) == 5
    assert body["top_k"][0]["label"] == body["label"]
    probs = [t["probability"] for t in body["top_k"]]
    assert probs == sorted(probs, reverse=True)
    assert body["margin"] == pytest.approx(probs[0] - probs[1]) or body["answered_by"] == "teacher"
    assert set(body["timings_ms"]) == {"preprocess", "queue", "student", "teacher", "total"}
    assert body["outcome"] in ("confident", "delegated")
    assert body["versions"]["student"] == Bundle.load(demo.bundle).manifest.version


def test_gateway_probabilities_equal_the_pytorch_students(gateway, demo):
    """Same image through training's path (uint8 -> normalize -> PyTorch) and the gateway's
    (PNG upload -> Pillow -> normalize -> ONNX Runtime)."""
    manifest = Bundle.load(demo.bundle).manifest
    info = manifest.training["student"]
    student = build(info["arch"], (1, 8, 8), 10, hidden=tuple(info["hidden"]))
    load_weights(student, demo.run / "student.pt")
    idx = list(range(0, 200, 10))
    with torch.no_grad():
        expected = softmax(
            student(torch.from_numpy(normalize(demo.images[idx], manifest.preprocess))).numpy()
        )
    with gateway() as (client, _):
        client.put(
            "/admin/threshold",
            json={"threshold": 0.0},
            headers={"authorization": "Bearer test-admin-token"},
        )
        r = client.post(
            "/predict",
            json={"inputs": [{"image": b64(png_bytes(demo.images[i]))} for i in idx], "top_k": 10},
        )
    got = np.zeros_like(expected)
    for row, out in enumerate(r.json()["outputs"]):
        assert out["answered_by"] == "student"
        for t in out["top_k"]:
            got[row, t["class_id"]] = t["probability"]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_batch_is_answered_in_order_and_matches_single_requests(gateway, demo):
    idx = [5, 17, 3, 99, 42, 7]
    with gateway() as (client, _):
        batch = client.post(
            "/predict", json={"inputs": [{"image": b64(png_bytes(demo.images[i]))} for i in idx]}
        ).json()["outputs"]
        singles = [
            client.post("/predict", json={"image": b64(png_bytes(demo.images[i]))}).json()
            for i in idx
        ]
    assert [o["label"] for o in batch] == [s["label"] for s in singles]
    assert [o["margin"] for o in batch] == pytest.approx([s["margin"] for s in singles])


def test_multipart_upload_one_and_several_files(gateway, demo):
    a, b = png_bytes(demo.images[0]), png_bytes(demo.images[1], fmt="JPEG")
    with gateway() as (client, _):
        one = client.post("/predict", files={"file": ("a.png", a, "image/png")})
        two = client.post(
            "/predict",
            files=[("file", ("a.png", a, "image/png")), ("file", ("b.jpg", b, "image/jpeg"))],
            data={"top_k": "2"},
        )
        raw = client.post("/predict?top_k=1", content=a, headers={"content-type": "image/png"})
    assert one.status_code == 200 and one.json()["label"] == "0"
    assert two.status_code == 200
    outs = two.json()["outputs"]
    assert len(outs) == 2 and all(len(o["top_k"]) == 2 for o in outs)
    assert raw.status_code == 200 and len(raw.json()["top_k"]) == 1


def test_hard_images_go_to_the_teacher_easy_ones_stay(gateway, demo):
    threshold = Bundle.load(demo.bundle).manifest.default_threshold
    easy, hard = easy_and_hard(demo, threshold)
    with gateway() as (client, teacher):
        teacher.answer = 4
        outs = client.post(
            "/predict",
            json={"inputs": [{"image": b64(png_bytes(demo.images[i]))} for i in easy + hard]},
        ).json()["outputs"]
        assert [o["answered_by"] for o in outs] == ["student"] * 5 + ["teacher"] * 5
        assert all(o["label"] == "4" for o in outs[5:])  # the teacher's answer wins
        assert all(o["margin"] < threshold for o in outs[5:])
        assert teacher.calls == [5]  # one teacher call for the delegated part of the batch
        assert metric(client, "cascade_items_total", outcome="delegated") == 5
        assert metric(client, "cascade_items_total", outcome="confident") == 5
        assert metric(client, "cascade_delegation_ratio", cascade="digits") == 0.5
        assert metric(client, "cascade_batch_size_count", model="teacher") == 1


@pytest.mark.parametrize("kind", ["timeout", "unavailable", "error"])
def test_failed_teacher_degrades_to_the_students_answer(gateway, demo, kind):
    threshold = Bundle.load(demo.bundle).manifest.default_threshold
    _, hard = easy_and_hard(demo, threshold, n=2)
    with gateway() as (client, teacher):
        teacher.fail = kind
        r = client.post("/predict", json={"image": b64(png_bytes(demo.images[hard[0]]))})
        assert r.status_code == 200
        body = r.json()
        assert (body["answered_by"], body["delegated"], body["degraded"]) == ("student", True, True)
        assert metric(client, "cascade_teacher_errors_total", kind=kind) == 1
        assert metric(client, "cascade_items_total", outcome="teacher_failed") == 1
        teacher.fail = None
        body = client.post("/predict", json={"image": b64(png_bytes(demo.images[hard[0]]))}).json()
        assert (body["answered_by"], body["degraded"]) == ("teacher", False)


def test_unexpected_error_is_a_generic_500_that_leaks_nothing(gateway, demo):
    _, hard = easy_and_hard(demo, Bundle.load(demo.bundle).manifest.default_threshold, n=1)
    with gateway() as (client, teacher):
        teacher.fail = "crash"
        r = client.post("/predict", json={"image": b64(png_bytes(demo.images[hard[0]]))})
        assert r.status_code == 500
        assert r.json() == {"error": {"code": "internal_error", "message": "internal error"}}
        assert "secret" not in r.text
        # the worker lives on
        teacher.fail = None
        assert client.post("/predict", json={"image": b64(png_bytes(demo.images[0]))}).is_success


def test_metrics_count_stage_latency_margins_and_in_flight(gateway, demo):
    with gateway() as (client, _):
        for i in range(3):
            client.post("/predict", json={"image": b64(png_bytes(demo.images[i]))})
        text = client.get("/metrics").text
        assert metric(client, "cascade_student_margin_count", cascade="digits") == 3
        for stage in ("preprocess", "queue", "student", "total", "overhead"):
            assert metric(client, "cascade_stage_seconds_count", stage=stage) == 3
        assert metric(client, "cascade_in_flight_requests") == 0
        assert metric(client, "cascade_threshold", cascade="digits") == pytest.approx(
            Bundle.load(demo.bundle).manifest.default_threshold
        )
    assert 'cascade_requests_total{cascade="digits",status="rejected"} 0.0' in text


def test_health_readiness_and_cascade_listing(gateway):
    with gateway(readiness_interval_s=0.02) as (client, teacher):
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        teacher.is_ready = False
        time.sleep(0.2)  # the background check sees it; the probe itself asks nobody
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503
        assert not_ready.json()["cascades"]["digits"] == {"student": True, "teacher": False}
        # A load balancer probe can keep routing (degraded answers) while the teacher is down.
        assert client.get("/readyz?teacher=optional").status_code == 200
        assert client.get("/readyz?teacher=maybe").status_code == 422
        listing = client.get("/cascades").json()["cascades"]
        assert [c["name"] for c in listing] == ["digits"]
        assert listing[0]["classes"] == [str(i) for i in range(10)]
        assert listing[0]["modality"] == "image"


def test_worker_id_header_only_when_asked(gateway, demo):
    payload = {"image": b64(png_bytes(demo.images[0]))}
    with gateway() as (client, _):
        assert "x-cascade-worker" not in client.post("/predict", json=payload).headers
    with gateway(expose_worker_id=True) as (client, _):
        assert client.post("/predict", json=payload).headers["x-cascade-worker"].isdigit()
