"""What the batch path keeps: delegated items captured with the teacher's probabilities (off the
response path, never failing a request), and the response cache of both tiers (real ONNX
Runtime student, the fake teacher counting its calls)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cascade_server.bundle import Bundle
from cascade_server.capture import read_capture
from cascade_server.policy import softmax
from cascade_server.preprocess import normalize

from ..conftest import b64, easy_and_hard, png_bytes
from .conftest import AUTH
from .test_hot_swap import second_version
from .test_predict import metric


def _inputs(demo, idx) -> dict:
    return {"inputs": [{"image": b64(png_bytes(demo.images[i]))} for i in idx]}


def _until(predicate, what: str, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_delegated_items_are_captured_with_the_teachers_probabilities(gateway, demo, tmp_path):
    bundle = Bundle.load(demo.bundle)
    easy, hard = easy_and_hard(demo, bundle.manifest.default_threshold)
    capture = {"directory": tmp_path / "capture", "flush_s": 0.05}
    with gateway(capture=capture) as (client, teacher):
        r = client.post("/predict", json=_inputs(demo, easy + hard))
        assert r.status_code == 200
        assert [a["answered_by"] for a in r.json()["outputs"]] == ["student"] * 5 + ["teacher"] * 5
        shards = _until(lambda: read_capture(tmp_path / "capture"), "a capture shard")
        assert metric(client, "cascade_capture_items_total", result="kept", reason="") == 5
    (shard,) = shards
    assert shard.meta["cascade"] == "digits" and shard.meta["student_version"] == (
        bundle.manifest.version
    )
    # Exactly the delegated items, as the student saw them, with the teacher's answer.
    expected = normalize(demo.images[hard], bundle.manifest.preprocess)
    np.testing.assert_array_equal(shard.inputs["input"], expected)
    logits = np.zeros((5, 10), np.float32)
    logits[:, teacher.answer] = 8.0
    np.testing.assert_allclose(shard.teacher_probs, softmax(logits), atol=1e-6)
    assert (shard.source == 0).all()


def test_capture_is_off_by_default(gateway, demo, tmp_path):
    _, hard = easy_and_hard(demo, Bundle.load(demo.bundle).manifest.default_threshold)
    with gateway() as (client, _):
        client.post("/predict", json=_inputs(demo, hard))
        assert "cascade_capture_items_total" not in client.get("/metrics").text or (
            metric(client, "cascade_capture_items_total", result="kept", reason="") == 0
        )


@pytest.mark.parametrize("where", ["under_a_file", "full_disk"])
def test_capture_never_fails_or_blocks_a_request(gateway, demo, tmp_path, monkeypatch, where):
    _, hard = easy_and_hard(demo, Bundle.load(demo.bundle).manifest.default_threshold)
    directory = tmp_path / "capture"
    if where == "under_a_file":  # unwritable, even for root: a path below a regular file
        (tmp_path / "file").write_text("")
        directory = tmp_path / "file" / "capture"
    else:
        import errno

        from cascade_server import capture as shard_format

        def full(*args, **kwargs):  # the disk full (tests/unit/test_capture.py has a real one)
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(shard_format, "write_shard", full)
    with gateway(capture={"directory": directory, "flush_s": 0.05}) as (client, _):
        for _ in range(3):
            r = client.post("/predict", json=_inputs(demo, hard))
            assert r.status_code == 200
            assert {a["answered_by"] for a in r.json()["outputs"]} == {"teacher"}
        if where == "full_disk":
            _until(
                lambda: (
                    metric(
                        client,
                        "cascade_capture_items_total",
                        result="dropped",
                        reason="write_error",
                    )
                    == 15
                ),
                "the dropped rows counted",
            )
        assert client.get("/readyz").status_code == 200


def test_the_cache_answers_a_repeated_input_without_the_teacher(gateway, demo):
    _, hard = easy_and_hard(demo, Bundle.load(demo.bundle).manifest.default_threshold)
    with gateway(cache={"enabled": True}) as (client, teacher):
        first = client.post("/predict", json=_inputs(demo, hard)).json()["outputs"]
        again = client.post("/predict", json=_inputs(demo, hard)).json()["outputs"]
        assert teacher.calls == [5]  # the second request ran neither model for these
        for a, b in zip(first, again, strict=True):
            assert (a["label"], a["answered_by"], a["outcome"]) == (
                b["label"],
                b["answered_by"],
                b["outcome"],
            )
            assert a["top_k"] == b["top_k"]
        hits = metric(client, "cascade_cache_requests_total", tier="teacher", result="hit")
        assert hits == 5
        assert metric(client, "cascade_cache_requests_total", tier="student", result="hit") == 5


def test_degraded_answers_are_not_cached(gateway, demo):
    _, hard = easy_and_hard(demo, Bundle.load(demo.bundle).manifest.default_threshold)
    with gateway(cache={"enabled": True}) as (client, teacher):
        teacher.fail = "unavailable"
        r = client.post("/predict", json=_inputs(demo, hard[:1])).json()["outputs"][0]
        assert r["degraded"]
        teacher.fail = None
        r = client.post("/predict", json=_inputs(demo, hard[:1])).json()["outputs"][0]
        assert r["answered_by"] == "teacher" and not r["degraded"]
        assert len(teacher.calls) == 2


def test_cache_keys_change_when_the_student_version_changes(gateway, demo, tmp_path):
    _, hard = easy_and_hard(demo, Bundle.load(demo.bundle).manifest.default_threshold)
    v2 = second_version(demo, tmp_path)
    with gateway(cache={"enabled": True}) as (client, teacher):
        client.post("/predict", json=_inputs(demo, hard))
        r = client.put("/admin/student", json={"bundle": str(v2)}, headers=AUTH)
        assert r.status_code == 200, r.text
        client.post("/predict", json=_inputs(demo, hard))
        # The student's rows were for another version: computed again; the teacher's version
        # did not change: its answers still serve.
        assert metric(client, "cascade_cache_requests_total", tier="student", result="hit") == 0
        assert metric(client, "cascade_cache_requests_total", tier="teacher", result="hit") == 5
        assert teacher.calls == [5]
