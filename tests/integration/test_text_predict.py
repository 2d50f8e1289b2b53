"""Text requests and two cascades in one gateway (digits images + intents texts), in process
with a fake teacher."""

from __future__ import annotations

import pytest

from cascade_server.bundle import Bundle

from ..conftest import b64, easy_and_hard_texts, png_bytes
from .conftest import AUTH
from .test_predict import metric


@pytest.fixture
def both(gateway, demo, text_demo):
    def make(**overrides):
        return gateway(bundles=[demo.bundle, text_demo.bundle], **overrides)

    return make


def intents_threshold(text_demo) -> float:
    return Bundle.load(text_demo.bundle).manifest.default_threshold


def test_text_is_answered_by_the_text_cascade_without_naming_it(both, demo, text_demo):
    with both() as (client, _):
        t = client.post("/predict", json={"text": "what is my savings account balance"})
        i = client.post("/predict", json={"image": b64(png_bytes(demo.images[0]))})
        raw = client.post(
            "/predict",
            content=b"i lost my credit card",
            headers={"content-type": "text/plain; charset=utf-8"},
        )
    assert t.status_code == 200, t.text
    body = t.json()
    assert body["cascade"] == "intents" and body["truncated"] is False
    assert body["label"] == "check_balance" or body["answered_by"] == "teacher"
    assert {
        "label",
        "class_id",
        "top_k",
        "margin",
        "delegated",
        "answered_by",
        "degraded",
        "versions",
        "timings_ms",
    } <= body.keys()
    assert i.json()["cascade"] == "digits" and "truncated" not in i.json()
    assert raw.status_code == 200 and raw.json()["cascade"] == "intents"


def test_text_batches_follow_the_margin_rule(both, text_demo):
    easy, hard = easy_and_hard_texts(text_demo, intents_threshold(text_demo))
    with both() as (client, teacher):
        teacher.n_classes, teacher.answer = 8, 6  # "open_account"
        outs = client.post("/predict", json={"inputs": [{"text": t} for t in easy + hard]}).json()
    answered = [o["answered_by"] for o in outs["outputs"]]
    assert answered == ["student"] * 3 + ["teacher"] * 3
    assert all(o["label"] == "open_account" for o in outs["outputs"][3:])


def test_long_texts_are_truncated_and_say_so(both):
    with both() as (client, _):
        body = client.post(
            "/predict", json={"text": "please send money to my landlord " * 40}
        ).json()
    assert body["truncated"] is True


def test_thresholds_metrics_and_readiness_are_per_cascade(both, demo, text_demo):
    digits_default = Bundle.load(demo.bundle).manifest.default_threshold
    with both() as (client, _):
        r = client.put(
            "/admin/threshold", json={"cascade": "intents", "threshold": 0.0}, headers=AUTH
        )
        assert r.status_code == 200 and r.json()["cascade"] == "intents"
        assert (
            client.get("/admin/threshold?cascade=digits", headers=AUTH).json()["threshold"]
            == digits_default
        )
        r = client.get("/admin/threshold", headers=AUTH)
        assert r.status_code == 422 and "name one with `cascade`" in r.json()["error"]["message"]
        client.post("/predict", json={"text": "convert 100 euros to yen"})
        client.post("/predict", json={"image": b64(png_bytes(demo.images[0]))})
        assert metric(client, "cascade_threshold", cascade="intents") == 0.0
        assert metric(client, "cascade_threshold", cascade="digits") == pytest.approx(
            digits_default
        )
        for name in ("intents", "digits"):
            assert metric(client, "cascade_requests_total", cascade=name) == 1
        listing = {c["name"]: c for c in client.get("/cascades").json()["cascades"]}
        assert listing["intents"]["modality"] == "text" and len(listing["intents"]["classes"]) == 8
        assert listing["intents"]["threshold"] == 0.0
        ready = client.get("/readyz").json()
        assert set(ready["cascades"]) == {"digits", "intents"}


@pytest.mark.parametrize(
    ("kwargs", "status", "fragment"),
    [
        ({"json": {"text": ""}}, 422, "text is empty"),
        ({"json": {"text": "   \n\t"}}, 422, "whitespace only"),
        ({"json": {"text": "x" * 101}}, 413, "101 characters; the limit is 100"),
        ({"json": {"text": 42}}, 422, "text: Input should be a valid string"),
        ({"json": {"text": ["a"]}}, 422, "text: Input should be a valid string"),
        ({"json": {"text": "hi", "cascade": "nope"}}, 404, "no cascade 'nope'"),
        ({"json": {"image": b64(b"x"), "cascade": "intents"}}, 422, "takes text, not image"),
        ({"json": {"inputs": [{"text": "ok"}, {"text": ""}]}}, 422, "inputs[1]: text is empty"),
        (
            {"content": b"caf\xe9", "headers": {"content-type": "text/plain"}},
            400,
            "not valid UTF-8",
        ),
        (
            {"content": b'{"text": "caf\xe9"}', "headers": {"content-type": "application/json"}},
            400,
            "not valid JSON (or not UTF-8)",
        ),
        (
            {"content": b'{"text": "\\ud800"}', "headers": {"content-type": "application/json"}},
            400,
            "not valid JSON",
        ),
    ],
)
def test_bad_text_input(both, kwargs, status, fragment):
    with both(max_text_chars=100) as (client, teacher):
        r = client.post("/predict", **kwargs)
        assert r.status_code == status, r.text
        assert fragment in r.json()["error"]["message"]
        assert teacher.calls == []
