"""`/docs` in a real browser (Debian's headless Chromium; `make tools` installs it) with every
host but the gateway unresolvable, as in a cluster without internet: Swagger UI's script must
come from the gateway and run, or the page stays an empty <div>."""

from __future__ import annotations

import shutil
import subprocess

import pytest

pytestmark = pytest.mark.e2e


def rendered_dom(url: str, profile: str) -> str:
    """The page's DOM after its scripts ran (up to 10 s of virtual time)."""
    binary = shutil.which("chromium")
    if binary is None:  # a failure, not a skip: `make tools` installs it
        raise RuntimeError("chromium is missing: apt-get install chromium (make tools)")
    cmd = [
        binary,
        "--headless",
        "--no-sandbox",  # runs as root in CI containers
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        # Air-gapped: a CDN's name does not resolve, only the gateway's address is reachable.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_swagger_ui_renders_the_operations_without_internet(gateway, tmp_path):
    dom = rendered_dom(f"{gateway.url}/docs", str(tmp_path / "chromium-profile"))
    # Operation blocks exist only once Swagger UI's script ran and rendered /openapi.json.
    assert 'class="opblock opblock-post' in dom, dom[-2000:]
    assert 'data-path="/predict"' in dom
    assert 'data-path="/v2/models/{name}/infer"' in dom
    # The schema's title and OpenAPI version, as Swagger UI renders them (3.1 needs UI >= 5).
    assert '<h1 class="title">cascade-server' in dom and "OAS 3.1" in dom
