import json

import pytest

from cascade_server.bundle import Bundle

from ..conftest import b64, easy_and_hard, png_bytes
from .conftest import AUTH
from .test_predict import metric


def test_admin_is_refused_entirely_without_a_configured_token(gateway):
    with gateway(admin_token=None) as (client, _):
        for call in (client.get, client.delete):
            r = call("/admin/threshold", headers=AUTH)
            assert r.status_code == 403 and "disabled" in r.json()["error"]["message"]
        r = client.put("/admin/threshold", json={"threshold": 0.5}, headers=AUTH)
        assert r.status_code == 403


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"authorization": "Basic dXNlcjpwYXNz"}, 401),
        ({"authorization": "Bearer"}, 401),
        ({"authorization": "Bearer wrong-token"}, 403),
    ],
)
def test_admin_needs_the_right_bearer_token(gateway, headers, status):
    with gateway() as (client, _):
        r = client.put("/admin/threshold", json={"threshold": 0.5}, headers=headers)
        assert r.status_code == status
        if status == 401:
            assert r.headers["www-authenticate"] == "Bearer"
        assert client.get("/admin/threshold", headers=AUTH).json()["source"] == "bundle"


def test_threshold_change_is_followed_by_the_next_requests(gateway, demo):
    manifest = Bundle.load(demo.bundle).manifest
    easy, hard = easy_and_hard(demo, manifest.default_threshold, n=2)
    payload = {"image": b64(png_bytes(demo.images[hard[0]]))}
    with gateway() as (client, _):
        state = client.get("/admin/threshold", headers=AUTH).json()
        assert state["source"] == "bundle"
        assert state["threshold"] == manifest.default_threshold
        assert state["expected_delegation_rate"] == pytest.approx(0.2, abs=0.02)
        assert client.post("/predict", json=payload).json()["answered_by"] == "teacher"

        r = client.put(
            "/admin/threshold",
            json={"threshold": 0.0},
            headers={**AUTH, "x-cascade-actor": "ops-oncall"},
        )
        assert r.status_code == 200, r.text
        assert r.json()["previous_threshold"] == manifest.default_threshold
        body = client.post("/predict", json=payload).json()
        assert (body["answered_by"], body["delegated"], body["threshold"]) == ("student", False, 0)

        state = client.get("/admin/threshold", headers=AUTH).json()
        assert (state["source"], state["threshold"]) == ("admin", 0.0)
        assert state["updated_by"].startswith("token ")
        assert state["updated_by"].endswith("(says: ops-oncall)")
        assert metric(client, "cascade_threshold", cascade="digits") == 0.0
        assert metric(client, "cascade_threshold_changes_total", cascade="digits") == 1

        r = client.put("/admin/threshold", json={"target_delegation_rate": 1.0}, headers=AUTH)
        assert r.json()["threshold"] == 1.0 and r.json()["target_delegation_rate"] == 1.0
        easy_body = client.post("/predict", json={"image": b64(png_bytes(demo.images[easy[0]]))})
        assert easy_body.json()["answered_by"] == "teacher"

        r = client.delete("/admin/threshold", headers=AUTH)
        assert r.json()["source"] == "bundle" and r.json()["previous_threshold"] == 1.0


def test_a_restart_keeps_the_threshold_and_the_change_is_logged(gateway, caplog):
    with gateway() as (client, _):
        client.put("/admin/threshold", json={"threshold": 0.33}, headers=AUTH)
    assert any("threshold" in r.message and "-> 0.3300" in r.message for r in caplog.records)
    with gateway() as (client, _):  # a new app process on the same state directory
        state = client.get("/admin/threshold", headers=AUTH).json()
        assert (state["threshold"], state["source"]) == (0.33, "admin")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"threshold": 1.5}, "less than or equal to 1"),
        ({"threshold": -0.1}, "greater than or equal to 0"),
        ({"target_delegation_rate": 2}, "less than or equal to 1"),
        ({}, "exactly one of"),
        ({"threshold": 0.1, "target_delegation_rate": 0.1}, "exactly one of"),
        ({"threshold": "high"}, "valid number"),
        ({"threshold": 0.1, "cascade": "nope"}, "no cascade"),
    ],
)
def test_invalid_admin_updates_are_422_and_change_nothing(gateway, body, fragment):
    with gateway() as (client, _):
        r = client.put("/admin/threshold", json=body, headers=AUTH)
        assert r.status_code in (404, 422), r.text
        assert fragment in r.json()["error"]["message"]
        assert client.get("/admin/threshold", headers=AUTH).json()["source"] == "bundle"


def test_audit_log_records_old_and_new(gateway, tmp_path):
    with gateway() as (client, _):
        client.put("/admin/threshold", json={"threshold": 0.25}, headers=AUTH)
        client.put("/admin/threshold", json={"threshold": 0.5}, headers=AUTH)
    lines = (tmp_path / "state" / "digits.threshold.audit.jsonl").read_text().splitlines()
    assert [(e["old"], e["new"]) for e in map(json.loads, lines)][-1] == (0.25, 0.5)


def test_the_calibrated_target_is_exported_for_the_drift_alert(gateway, demo):
    calibration = Bundle.load(demo.bundle).manifest.calibration
    with gateway() as (client, _):
        assert metric(client, "cascade_expected_delegation_ratio", cascade="digits") == (
            pytest.approx(0.2, abs=0.02)
        )
        client.put("/admin/threshold", json={"target_delegation_rate": 0.35}, headers=AUTH)
        assert metric(client, "cascade_expected_delegation_ratio") == pytest.approx(0.35, abs=1e-6)
        client.put("/admin/threshold", json={"threshold": 0.5}, headers=AUTH)
        assert metric(client, "cascade_expected_delegation_ratio") == pytest.approx(
            calibration.rate_for_threshold(0.5)
        )
