"""Two gateway "replicas" (separate processes and state directories) sharing one real Redis:
an admin change through one is seen by the other within a second; Redis killed and restarted:
no failed request, readiness reports it, and a change made after the restart propagates."""

from __future__ import annotations

import os
import time

import pytest

from ..conftest import b64, png_bytes
from ..redis_server import RedisServer
from .conftest import AUTH, TOKEN, serving, wait_until

pytestmark = pytest.mark.e2e


def test_two_replicas_share_runtime_control_through_redis(demo, triton, tmp_path):
    redis = RedisServer(tmp_path / "redis").start()
    payload = {"image": b64(png_bytes(demo.images[0]))}
    args = ["--bundle", str(demo.bundle), "--triton-url", triton.grpc_url]

    def env(name):
        return {
            **os.environ,
            "CASCADE_ADMIN_TOKEN": TOKEN,
            "CASCADE_CONTROL_STORE": "redis",
            "CASCADE_REDIS_URL": redis.url,
            "CASCADE_STATE_DIR": str(tmp_path / name / "state"),  # not shared: Redis is
            "CASCADE_LOG_LEVEL": "warning",
        }

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    try:
        with (
            serving(args, tmp_path / "a", env("a")) as a,
            serving(args, tmp_path / "b", env("b")) as b,
        ):
            with a.client() as ca, b.client() as cb:
                store = cb.get("/readyz").json()["control_store"]
                assert store == {"kind": "redis", "up": True, "synced": True}
                assert ca.put("/admin/threshold", json={"threshold": 0.11}, headers=AUTH).is_success
                started = time.monotonic()
                wait_until(lambda: cb.post("/predict", json=payload).json()["threshold"] == 0.11,
                           1.0, "the change on the other replica", 0.02)  # fmt: skip
                assert time.monotonic() - started < 1.0

                redis.kill()
                wait_until(lambda: not cb.get("/readyz").json()["control_store"]["up"], 5,
                           "the store reported down")  # fmt: skip
                for _ in range(20):  # no failed request; the last value in force
                    r = cb.post("/predict", json=payload)
                    assert r.status_code == 200 and r.json()["threshold"] == 0.11
                assert cb.get("/readyz").status_code == 200
                assert "cascade_control_store_up 0.0" in cb.get("/metrics").text
                r = cb.put("/admin/threshold", json={"threshold": 0.9}, headers=AUTH)
                assert r.status_code == 503 and "nothing was changed" in r.text

                redis.start()
                wait_until(lambda: ca.get("/readyz").json()["control_store"]["up"], 10,
                           "the store back")  # fmt: skip
                assert ca.put("/admin/threshold", json={"threshold": 0.22}, headers=AUTH).is_success
                wait_until(lambda: cb.post("/predict", json=payload).json()["threshold"] == 0.22,
                           3.0, "the change after the restart")  # fmt: skip
    finally:
        redis.kill()
