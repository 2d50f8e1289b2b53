"""Schemathesis against the gateway's own OpenAPI document, over real HTTP (uvicorn, real
Triton): generated requests for every documented operation, bounded in number and seeded. No
5xx, and every answer conforms to the documented status codes, headers, content types and
schemas. Excluded: `positive_data_acceptance`, since which cascade names exist and that exactly
one of `image`/`text`/`inputs` is given are runtime rules the JSON schema does not state."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import TOKEN, serving

pytestmark = pytest.mark.e2e


def test_generated_requests_get_documented_answers(demo, text_demo, triton, tmp_path):
    env = {
        **os.environ,
        "CASCADE_ADMIN_TOKEN": TOKEN,
        "CASCADE_STATE_DIR": str(tmp_path / "state"),  # its admin calls change nobody else's
        "CASCADE_LOG_LEVEL": "warning",
    }
    args = ["--bundle", str(demo.bundle), "--bundle", str(text_demo.bundle), "--triton-url",
            triton.grpc_url]  # fmt: skip
    st = Path(sys.executable).parent / "schemathesis"
    with serving(args, tmp_path, env) as gw:
        cmd = [str(st), "run", f"{gw.url}/openapi.json", "--max-examples", "25", "--seed", "1",
               "--header", f"Authorization: Bearer {TOKEN}", "--checks", "all", "--exclude-checks",
               "positive_data_acceptance", "--request-timeout", "10"]  # fmt: skip
        # In the test's own directory: schemathesis keeps a cache where it runs.
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-6000:]
    assert "generated" in done.stdout
