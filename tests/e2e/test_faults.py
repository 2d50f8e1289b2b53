"""Faults with real processes: a hung tritonserver (SIGSTOP) behind the circuit breaker, and a
SIGTERM drain of the gateway. The longer runs under load are benchmarks/reliability.py."""

from __future__ import annotations

import os
import signal
import time

import httpx2
import pytest

from cascade_server.bundle import Bundle
from cascade_server.triton import TritonServer, python_backend_repository

from ..conftest import b64, easy_and_hard, png_bytes
from .conftest import serving, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture
def own_triton(demo, tmp_path):
    """A tritonserver of this test's own, free to be stopped."""
    repo = python_backend_repository(demo.repository, tmp_path / "triton" / "repository")
    with TritonServer(repo, tmp_path / "triton") as server:
        yield server
        os.killpg(server.process.pid, signal.SIGCONT)


def test_a_hung_triton_opens_the_circuit_and_answers_stay_fast(demo, own_triton, tmp_path):
    threshold = Bundle.load(demo.bundle).manifest.default_threshold
    _, hard = easy_and_hard(demo, threshold, n=1)
    payload = {"image": b64(png_bytes(demo.images[hard[0]]))}
    env = {
        **os.environ,
        "CASCADE_STATE_DIR": str(tmp_path / "state"),
        "CASCADE_TEACHER_TIMEOUT_S": "0.3",
        "CASCADE_TEACHER_BREAKER__FAILURES": "2",
        "CASCADE_TEACHER_BREAKER__OPEN_S": "1.0",
        "CASCADE_LOG_LEVEL": "warning",
    }
    args = ["--bundle", str(demo.bundle), "--triton-url", own_triton.grpc_url]
    with serving(args, tmp_path, env) as gw, gw.client() as client:
        assert client.post("/predict", json=payload).json()["answered_by"] == "teacher"
        os.killpg(own_triton.process.pid, signal.SIGSTOP)
        timings = []
        for _ in range(6):
            started = time.perf_counter()
            r = client.post("/predict", json=payload)
            timings.append(time.perf_counter() - started)
            assert r.status_code == 200
            assert (r.json()["answered_by"], r.json()["degraded"]) == ("student", True)
        assert min(timings[:2]) >= 0.25  # the first two waited for the deadline
        assert max(timings[2:]) < 0.2  # then the open circuit answers at once
        metrics = client.get("/metrics").text
        assert 'cascade_teacher_circuit_state{cascade="digits"} 2.0' in metrics
        os.killpg(own_triton.process.pid, signal.SIGCONT)

        def teacher_answers() -> bool:
            return client.post("/predict", json=payload).json()["answered_by"] == "teacher"

        wait_until(teacher_answers, 10, "the half-open probe closing the circuit", 0.2)
        metrics = client.get("/metrics").text
        assert 'cascade_teacher_circuit_state{cascade="digits"} 0.0' in metrics


def test_sigterm_drains_readiness_first_then_stops(demo, triton, tmp_path):
    env = {
        **os.environ,
        "CASCADE_STATE_DIR": str(tmp_path / "state"),
        "CASCADE_DRAIN_S": "1.5",
        "CASCADE_LOG_LEVEL": "warning",
    }
    payload = {"image": b64(png_bytes(demo.images[0]))}
    args = ["--bundle", str(demo.bundle), "--triton-url", triton.grpc_url]
    with serving(args, tmp_path, env) as gw:
        with gw.client() as client:
            assert client.get("/readyz").status_code == 200
            sent = time.monotonic()
            gw.process.send_signal(signal.SIGTERM)
            wait_until(lambda: client.get("/readyz").status_code == 503, 1.0, "readiness 503", 0.05)
            assert client.get("/readyz").json()["draining"] is True
            # still serving while load balancers catch up
            assert client.post("/predict", json=payload).status_code == 200
            assert client.get("/healthz").status_code == 200
        assert gw.process.wait(20) == 0
        assert time.monotonic() - sent >= 1.4
        with pytest.raises(httpx2.TransportError):
            httpx2.get(f"{gw.url}/healthz", timeout=1)
