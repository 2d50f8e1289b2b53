"""Two cascades in one gateway over real Triton: the demo and a CD-III student whose abstain
output delegates to the same teacher."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx2
import pytest

from cascade_server.triton import free_port

from ..conftest import b64, png_bytes
from .conftest import wait_until

pytestmark = pytest.mark.e2e


def test_cd3_abstains_to_the_real_teacher_beside_the_demo(demo, cd3_bundle, triton, tmp_path):
    port = free_port()
    env = {**os.environ, "CASCADE_STATE_DIR": str(tmp_path / "state")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    cmd = [
        sys.executable,
        "-m",
        "cascade_server.serve",
        "--port",
        str(port),
        "--bundle",
        str(demo.bundle),
        "--bundle",
        str(cd3_bundle.path),
        "--triton-url",
        triton.grpc_url,
        "--workdir",
        str(tmp_path / "w"),
    ]
    log = tmp_path / "gw.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return httpx2.get(f"{base}/readyz", timeout=1).status_code == 200
            except httpx2.TransportError:
                return False

        wait_until(ready, 60, "gateway with two cascades")
        with httpx2.Client(base_url=base, timeout=10) as client:
            listed = {c["name"]: c for c in client.get("/cascades").json()["cascades"]}
            assert set(listed) == {"digits", "digitscd3"}
            ready_detail = client.get("/readyz").json()["cascades"]
            assert ready_detail == {name: {"student": True, "teacher": True} for name in listed}

            image = b64(png_bytes(demo.images[0]))
            r = client.post("/predict", json={"image": image})
            assert (
                r.status_code == 422 and "name one with `cascade`" in r.json()["error"]["message"]
            )

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
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
