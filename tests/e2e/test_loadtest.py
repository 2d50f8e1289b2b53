"""`make loadtest`'s runner against the real gateway: locust posts labelled images and texts,
and the summary reports throughput, latency, delegation and accuracy under load."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import AUTH, ROOT

pytestmark = pytest.mark.e2e


def test_loadtest_runner_writes_a_summary_with_accuracy_under_load(gateway, tmp_path):
    with gateway.client() as c:
        for name in ("digits", "intents"):
            c.delete(f"/admin/threshold?cascade={name}", headers=AUTH)
    out = tmp_path / "loadtest"
    cmd = [
        sys.executable, "-m", "loadtests.run", "--host", gateway.url, "--users", "4",
        "--spawn-rate", "4", "--duration", "6s", "--image-data", "digits", "--text-data",
        "intents", "--limit", "300", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    overall = summary["overall"]
    assert overall["requests"] > 20 and overall["failures"] == 0 and overall["errors"] == 0
    assert overall["p50_ms"] <= overall["p95_ms"] <= overall["p99_ms"]
    for kind in ("image", "text"):
        # The demo cascades are 0.99+ accurate offline at their calibrated delegation (~20%).
        assert summary[kind]["accuracy"] > 0.95, summary[kind]
        assert 0.05 < summary[kind]["delegation_rate"] < 0.5, summary[kind]
        assert summary[kind]["degraded_rate"] == 0
    assert (out / "loadtest.png").stat().st_size > 10_000
    assert (out / "locust_stats_history.csv").is_file()
