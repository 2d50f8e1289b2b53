"""Real processes on free ports: the bundled tritonserver and `cascade-serve` with 2 workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx2
import pytest

from cascade_server.triton import TritonServer, free_port, python_backend_repository

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "e2e-admin-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="session")
def triton(demo, text_demo, tmp_path_factory):
    # Both demos are in the repository before it is copied: a Triton started for an image-only
    # test first would otherwise lack the intents teacher, and the session's gateway (both
    # cascades) would never be ready.
    workdir = tmp_path_factory.mktemp("triton")
    repo = python_backend_repository(demo.repository, workdir / "repository")
    server = TritonServer(repo, workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()
    assert server.process is None


class Gateway:
    def __init__(self, url: str, process: subprocess.Popen, log: Path) -> None:
        self.url = url
        self.process = process
        self.log = log

    def client(self) -> httpx2.Client:
        return httpx2.Client(base_url=self.url, timeout=10.0)


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not within {timeout_s}s")


@contextmanager
def serving(args: list[str], workdir: Path, env: dict[str, str], *, timeout_s: float = 90):
    """`python -m cascade_server.serve ARGS --port P --workdir W` until ready; always stopped
    with SIGINT (what Ctrl-C sends), killed if it does not exit in 30 s."""
    port = free_port()
    env = {k: v for k, v in env.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    log = workdir / "serve.log"
    cmd = [
        sys.executable,
        "-m",
        "cascade_server.serve",
        *args,
        "--port",
        str(port),
        "--workdir",
        str(workdir / "run"),
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    gw = Gateway(f"http://127.0.0.1:{port}", process, log)

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"gateway exited: {log.read_text()}")
        try:
            return httpx2.get(f"{gw.url}/readyz", timeout=1).status_code == 200
        except httpx2.TransportError:
            return False

    try:
        wait_until(ready, timeout_s, "gateway ready")
        yield gw
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def gateway(demo, text_demo, triton, tmp_path_factory):
    """cascade-serve, 2 uvicorn workers, both demo cascades, pointed at the session's Triton."""
    workdir = tmp_path_factory.mktemp("gateway")
    env = {
        **os.environ,
        "CASCADE_ADMIN_TOKEN": TOKEN,
        "CASCADE_STATE_DIR": str(workdir / "state"),
        "CASCADE_EXPOSE_WORKER_ID": "true",
        "CASCADE_TEACHER_TIMEOUT_S": "2.0",
        "CASCADE_TEACHER_RECONNECT_BACKOFF_MS": "250",
        "CASCADE_READINESS_INTERVAL_S": "0.2",
        "CASCADE_LOG_LEVEL": "warning",
    }
    args = [
        "--workers",
        "2",
        "--bundle",
        str(demo.bundle),
        "--bundle",
        str(text_demo.bundle),
        "--triton-url",
        triton.grpc_url,
    ]
    with serving(args, workdir, env) as gw:
        yield gw
