"""A real Prometheus server scrapes a running gateway (2 workers) and the bundled Triton, with the
project's recording and alerting rules loaded; the delegation ratio, the latency and Triton's
queue series are read back through Prometheus's HTTP API and checked against what was sent."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import httpx2
import pytest

from cascade_server.bundle import Bundle

from ..conftest import b64, easy_and_hard, png_bytes
from ..prometheus_server import PrometheusServer
from .conftest import TOKEN, serving, wait_until

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def _one(result: dict, what: str) -> float:
    assert len(result) == 1, f"{what}: {result}"
    return next(iter(result.values()))


def test_prometheus_reads_delegation_latency_and_triton_queue(demo, triton, tmp_path):
    env = {
        **os.environ,
        "CASCADE_ADMIN_TOKEN": TOKEN,
        "CASCADE_STATE_DIR": str(tmp_path / "state"),
        "CASCADE_LOG_LEVEL": "warning",
    }
    args = ["--workers", "2", "--bundle", str(demo.bundle), "--triton-url", triton.grpc_url]
    threshold = Bundle.load(demo.bundle).manifest.default_threshold
    easy, hard = easy_and_hard(demo, threshold)
    (tmp_path / "gw").mkdir()
    with serving(args, tmp_path / "gw", env) as gw:
        prom = PrometheusServer(
            tmp_path / "prometheus",
            {
                "gateway": gw.url.removeprefix("http://"),
                "triton": f"{triton.host}:{triton.ports.metrics}",
            },
        ).start()
        try:
            with gw.client() as client:

                def send(indices):
                    for i in indices:
                        r = client.post("/predict", json={"image": b64(png_bytes(demo.images[i]))})
                        assert r.status_code == 200, r.text

                # One of each first, so the counters exist before the measured window: rate()
                # needs the series' earlier samples to see the increase.
                send([easy[0], hard[0]])
                wait_until(
                    lambda: len(prom.query('cascade_items_total{cascade="digits"}')) >= 2,
                    30,
                    "first scrape of both outcomes",
                )
                send(easy[1:] + hard[1:])

            def counted() -> dict[str, float]:
                by = prom.query('sum by (outcome) (cascade_items_total{cascade="digits"})')
                return {dict(k)["outcome"]: v for k, v in by.items() if v}

            try:
                wait_until(lambda: counted() == {"confident": 5.0, "delegated": 5.0}, 30, "scraped")
            except TimeoutError:
                raise AssertionError(f"Prometheus counts {counted()}") from None
            # Targets up; the project's rules loaded and evaluated by a real server.
            up = prom.query("up")
            assert up == {(("instance", k), ("job", j)): 1.0 for j, k in prom.targets.items()}
            groups = {g["name"]: g for g in prom.api("rules")["groups"]}
            assert {"cascade-recording", "cascade-alerts"} <= set(groups)
            for group in groups.values():
                assert all(r["health"] in ("ok", "unknown") for r in group["rules"]), group

            # The ratio since start (the gateway's own gauge, summed over its workers) ...
            ratio = _one(prom.query('cascade_delegation_ratio{cascade="digits"}'), "ratio")
            assert ratio == pytest.approx(0.5)
            # ... and the windowed recording rule: the 8 requests after the first scrape.
            wait_until(
                lambda: bool(prom.query('cascade:delegation_ratio:rate5m{cascade="digits"}')),
                30,
                "recording rule evaluated",
            )
            windowed = _one(prom.query('cascade:delegation_ratio:rate5m{cascade="digits"}'), "rule")
            assert windowed == pytest.approx(0.5, abs=0.01)
            expected = prom.query('max(cascade_expected_delegation_ratio{cascade="digits"})')
            assert 0 < _one(expected, "expected ratio") < 1

            # Latency: the median total per request from the histogram, in seconds.
            p50 = _one(
                prom.query(
                    "histogram_quantile(0.5, sum by (le) (rate("
                    'cascade_stage_seconds_bucket{cascade="digits",stage="total"}[1m])))'
                ),
                "p50",
            )
            assert 0 < p50 < 5
            teacher_calls = _one(
                prom.query('sum(cascade_stage_seconds_count{cascade="digits",stage="teacher"})'),
                "teacher calls",
            )
            assert teacher_calls == 5  # one call per delegated request: they came one by one

            # Triton's own series through the same Prometheus: its inference count agrees with
            # its statistics API, and the autoscaler's queue-time query has a value.
            def triton_count() -> int:
                url = f"{triton.http_url}/v2/models/digits_teacher/stats"
                stats = httpx2.get(url, timeout=5).json()
                return int(stats["model_stats"][0]["inference_count"])

            wait_until(
                lambda: (
                    prom.query('nv_inference_count{model="digits_teacher"}')
                    and _one(prom.query('nv_inference_count{model="digits_teacher"}'), "count")
                    == triton_count()
                ),
                30,
                "Triton's inference count scraped",
            )
            queue = _one(
                prom.query(
                    'sum(rate(nv_inference_queue_duration_us{model="digits_teacher"}[1m]))'
                    ' / clamp_min(sum(rate(nv_inference_request_success{model="digits_teacher"}'
                    "[1m])), 1)"
                ),
                "queue us per request",
            )
            assert math.isfinite(queue) and queue >= 0

            # Every Grafana panel's query is valid PromQL for this server, and the cascade's
            # panels have data (Triton's GPU panel has none on a CPU-only machine).
            dashboard = json.loads((ROOT / "deploy/grafana/cascade.json").read_text())
            for panel in dashboard["panels"]:
                for target in panel.get("targets", []):
                    result = prom.api("query", query=target["expr"])["result"]
                    if target["expr"].startswith("cascade"):
                        assert result, f"{panel['title']}: {target['expr']} has no data"
        finally:
            prom.stop()
