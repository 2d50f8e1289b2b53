"""The whole cascade over real sockets: uvicorn (2 workers) -> ONNX student -> real Triton."""

from __future__ import annotations

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cascade_server.bundle import Bundle

from ..conftest import b64, easy_and_hard, png_bytes
from .conftest import AUTH, wait_until

pytestmark = pytest.mark.e2e


def scrape(gateway) -> dict[tuple, float]:
    text = httpx2.get(f"{gateway.url}/metrics", timeout=5).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels) -> float:
    return sum(
        v
        for (n, ls), v in samples.items()
        if n == name and all(dict(ls).get(k) == x for k, x in labels.items())
    )


def triton_inferences(triton) -> int:
    stats = httpx2.get(f"{triton.http_url}/v2/models/digits_teacher/stats", timeout=5).json()
    return int(stats["model_stats"][0]["inference_count"])


def predict(client: httpx2.Client, demo, index: int) -> dict:
    r = client.post("/predict", json={"image": b64(png_bytes(demo.images[index]))})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture
def default_threshold(gateway, demo):
    """Each test starts from the bundle's threshold and leaves it so."""
    with gateway.client() as c:
        assert c.delete("/admin/threshold?cascade=digits", headers=AUTH).status_code == 200
    yield Bundle.load(demo.bundle).manifest.default_threshold
    with gateway.client() as c:
        c.delete("/admin/threshold?cascade=digits", headers=AUTH)


def test_easy_digits_stay_with_the_student_hard_ones_reach_triton(
    gateway, triton, demo, default_threshold
):
    easy, hard = easy_and_hard(demo, default_threshold)
    before_metrics, before_triton = scrape(gateway), triton_inferences(triton)
    with gateway.client() as client:
        easy_out = [predict(client, demo, i) for i in easy]
        hard_out = [predict(client, demo, i) for i in hard]
        batch = client.post(
            "/predict",
            json={"inputs": [{"image": b64(png_bytes(demo.images[i]))} for i in easy + hard]},
        )
    assert [o["answered_by"] for o in easy_out] == ["student"] * 5
    assert [o["answered_by"] for o in hard_out] == ["teacher"] * 5
    assert not any(o["degraded"] for o in easy_out + hard_out)
    assert all(o["timings_ms"]["teacher"] > 0 for o in hard_out)
    outs = batch.json()["outputs"]
    assert [o["answered_by"] for o in outs] == ["student"] * 5 + ["teacher"] * 5
    # The real teacher (99% on digits) gets the hard ones right.
    assert sum(o["class_id"] == demo.labels[i] for o, i in zip(hard_out, hard, strict=True)) >= 4

    # Triton saw exactly the delegated items: 5 single requests and 5 in one batch.
    assert triton_inferences(triton) - before_triton == 10
    after = scrape(gateway)
    for outcome, n in (("confident", 10), ("delegated", 10), ("teacher_failed", 0)):
        delta = value(after, "cascade_items_total", outcome=outcome) - value(
            before_metrics, "cascade_items_total", outcome=outcome
        )
        assert delta == n, outcome
    # 10 single requests and 1 batch of 10: 11 HTTP calls for 20 items.
    ok = value(after, "cascade_requests_total", status="ok") - value(
        before_metrics, "cascade_requests_total", status="ok"
    )
    assert ok == 11
    assert (
        value(after, "cascade_student_margin_count")
        - value(before_metrics, "cascade_student_margin_count")
        == 20
    )
    assert (
        value(after, "cascade_stage_seconds_count", stage="teacher")
        - value(before_metrics, "cascade_stage_seconds_count", stage="teacher")
        == 6
    )
    assert 0 < value(after, "cascade_delegation_ratio", cascade="digits") < 1


def test_threshold_change_reaches_every_worker(gateway, demo, default_threshold):
    _, hard = easy_and_hard(demo, default_threshold, n=1)
    with gateway.client() as admin:
        r = admin.put(
            "/admin/threshold", json={"cascade": "digits", "threshold": 0.0}, headers=AUTH
        )
        assert r.status_code == 200
    seen: dict[str, list[dict]] = {}
    # Fresh connections, so the kernel spreads them over both workers.
    for _ in range(60):
        with gateway.client() as client:
            r = client.post("/predict", json={"image": b64(png_bytes(demo.images[hard[0]]))})
        seen.setdefault(r.headers["x-cascade-worker"], []).append(r.json())
        if len(seen) == 2 and min(map(len, seen.values())) >= 3:
            break
    assert len(seen) == 2, "requests never reached the second worker"
    for answers in seen.values():
        assert all(a["threshold"] == 0.0 and a["answered_by"] == "student" for a in answers)
    samples = scrape(gateway)
    assert value(samples, "cascade_threshold", cascade="digits") == 0.0
    # And back to the bundle's default, again on every worker.
    with gateway.client() as admin:
        assert (
            admin.delete("/admin/threshold?cascade=digits", headers=AUTH).json()["source"]
            == "bundle"
        )
    pids = set()
    for _ in range(60):
        with gateway.client() as client:
            r = client.post("/predict", json={"image": b64(png_bytes(demo.images[hard[0]]))})
        assert r.json()["answered_by"] == "teacher"
        pids.add(r.headers["x-cascade-worker"])
        if len(pids) == 2:
            break
    assert len(pids) == 2


def test_teacher_killed_then_back(gateway, triton, demo, default_threshold):
    _, hard = easy_and_hard(demo, default_threshold, n=3)
    with gateway.client() as client:
        assert predict(client, demo, hard[0])["answered_by"] == "teacher"
        before = scrape(gateway)
        triton.kill()  # SIGKILL: a crash, not a drain
        for i in hard:
            out = predict(client, demo, i)
            assert (out["answered_by"], out["delegated"], out["degraded"]) == (
                "student",
                True,
                True,
            )
        after = scrape(gateway)
        assert (
            value(after, "cascade_items_total", outcome="teacher_failed")
            - value(before, "cascade_items_total", outcome="teacher_failed")
            == 3
        )
        assert (
            value(after, "cascade_teacher_errors_total")
            - value(before, "cascade_teacher_errors_total")
            == 3
        )
        # readiness comes from the background check (every 0.2 s in these tests)
        wait_until(lambda: client.get("/readyz").status_code == 503, 5, "readiness 503")
        assert client.get("/healthz").status_code == 200

        triton.start()  # same ports
        wait_until(lambda: client.get("/readyz").status_code == 200, 30, "readiness back")
        wait_until(
            lambda: predict(client, demo, hard[0])["answered_by"] == "teacher",
            15,
            "teacher answering again",
        )
        out = predict(client, demo, hard[1])
        assert (out["answered_by"], out["degraded"]) == ("teacher", False)


def test_bad_input_over_real_http_is_4xx_and_the_gateway_lives_on(gateway, demo):
    with gateway.client() as client:
        r = client.post("/predict", content=b"{oops", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
        r = client.post("/predict", files={"file": ("x.png", b"not an image", "image/png")})
        assert r.status_code == 422
        assert client.post("/predict", json={"image": b64(png_bytes(demo.images[0]))}).is_success


def triton_count(triton, model: str) -> int:
    stats = httpx2.get(f"{triton.http_url}/v2/models/{model}/stats", timeout=5).json()
    return int(stats["model_stats"][0]["inference_count"])


def test_text_cascade_over_real_triton(gateway, triton, text_demo):
    from ..conftest import easy_and_hard_texts

    threshold = Bundle.load(text_demo.bundle).manifest.default_threshold
    easy, hard = easy_and_hard_texts(text_demo, threshold)
    before = triton_count(triton, "intents_teacher")
    digits_before = triton_count(triton, "digits_teacher")
    metrics_before = scrape(gateway)
    with gateway.client() as client:
        outs = client.post("/predict", json={"inputs": [{"text": t} for t in easy + hard]})
        assert outs.status_code == 200, outs.text
        answers = outs.json()["outputs"]
        single = client.post("/predict", json={"text": hard[0]}).json()
    assert [o["answered_by"] for o in answers] == ["student"] * 3 + ["teacher"] * 3
    assert all(o["cascade"] == "intents" and o["truncated"] is False for o in answers)
    assert single["answered_by"] == "teacher" and not single["degraded"]
    # The text teacher on Triton took token ids: exactly the 4 delegated texts, nothing else.
    assert triton_count(triton, "intents_teacher") - before == 4
    assert triton_count(triton, "digits_teacher") == digits_before
    after = scrape(gateway)
    delta = value(after, "cascade_items_total", cascade="intents", outcome="delegated") - value(
        metrics_before, "cascade_items_total", cascade="intents", outcome="delegated"
    )
    assert delta == 4
