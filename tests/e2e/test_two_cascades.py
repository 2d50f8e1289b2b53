"""Two cascades in one gateway over real Triton: the demo and a CD-III student whose abstain
output delegates to the same teacher."""

from __future__ import annotations

import os

import pytest

from ..conftest import b64, png_bytes
from .conftest import serving

pytestmark = pytest.mark.e2e


def test_cd3_abstains_to_the_real_teacher_beside_the_demo(demo, cd3_bundle, triton, tmp_path):
    env = {**os.environ, "CASCADE_STATE_DIR": str(tmp_path / "state")}
    args = [
        "--bundle",
        str(demo.bundle),
        "--bundle",
        str(cd3_bundle.path),
        "--triton-url",
        triton.grpc_url,
    ]
    with serving(args, tmp_path, env) as gw, gw.client() as client:
        listed = {c["name"]: c for c in client.get("/cascades").json()["cascades"]}
        assert set(listed) == {"digits", "digitscd3"}
        ready_detail = client.get("/readyz").json()["cascades"]
        assert ready_detail == {name: {"student": True, "teacher": True} for name in listed}

        image = b64(png_bytes(demo.images[0]))
        r = client.post("/predict", json={"image": image})
        assert r.status_code == 422 and "name one with `cascade`" in r.json()["error"]["message"]

        outside = [i for i in range(300) if demo.labels[i] >= 5][:10]
        outs = client.post(
            "/predict",
            json={
                "cascade": "digitscd3",
                "inputs": [{"image": b64(png_bytes(demo.images[i]))} for i in outside],
            },
        ).json()["outputs"]
        teacher_answers = [
            (o, i) for o, i in zip(outs, outside, strict=True) if o["answered_by"] == "teacher"
        ]
        assert len(teacher_answers) >= 8
        # The real teacher knows every class, including those the student abstains on.
        assert sum(o["class_id"] == demo.labels[i] for o, i in teacher_answers) >= 7
        same = client.post("/predict?cascade=digits", json={"image": image}).json()
        assert same["cascade"] == "digits"
