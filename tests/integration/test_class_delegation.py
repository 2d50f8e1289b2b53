"""Class-specific students in the gateway: a CD-III student's abstain output delegates, and
its outputs map to the cascade's class ids."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from cascade_server.bundle import Bundle
from cascade_server.gateway.app import create_app
from cascade_server.settings import Settings

from ..conftest import b64, png_bytes
from .conftest import FakeTeacher


def test_cd3_manifest_describes_the_abstain_output(cd3_bundle):
    m = Bundle.load(cd3_bundle.path).manifest
    assert m.output_classes == (0, 1, 2, 3, 4, -1)
    assert m.abstain_output == 5
    assert m.training["method"] == "cd3"


def test_gateway_delegates_when_abstain_wins(cd3_bundle, demo, tmp_path):
    teacher = FakeTeacher(answer=9)
    settings = Settings(bundles=[cd3_bundle.path], state_dir=tmp_path, admin_token="t")
    app = create_app(settings, teacher_factory=lambda s, b: teacher)
    inside = [i for i in range(200) if demo.labels[i] < 5][:20]
    outside = [i for i in range(200) if demo.labels[i] >= 5][:20]
    with TestClient(app) as client:
        r = client.put(
            "/admin/threshold", json={"threshold": 0.0}, headers={"authorization": "Bearer t"}
        )
        assert r.status_code == 200, r.text
        outs = client.post(
            "/predict",
            json={
                "inputs": [{"image": b64(png_bytes(demo.images[i]))} for i in inside + outside],
                "top_k": 10,
            },
        ).json()["outputs"]
    ins, outs_ = outs[: len(inside)], outs[len(inside) :]
    # Out-of-domain digits: the student abstains, so the teacher answers (the fake says 9).
    assert np.mean([o["answered_by"] == "teacher" for o in outs_]) > 0.8
    assert all(o["label"] == "9" for o in outs_ if o["answered_by"] == "teacher")
    # In-domain digits stay with the student and are answered with in-domain class ids.
    kept = [o for o in ins if o["answered_by"] == "student"]
    assert len(kept) > 0.8 * len(ins)
    assert all(o["class_id"] < 5 for o in kept)
    assert (
        np.mean(
            [
                o["class_id"] == demo.labels[i]
                for o, i in zip(ins, inside, strict=True)
                if o["answered_by"] == "student"
            ]
        )
        > 0.9
    )
    for o in kept:  # top_k is over the cascade's 10 classes; the abstain output is not one
        assert len(o["top_k"]) == 10
        assert sum(t["probability"] for t in o["top_k"]) == pytest.approx(1.0)
