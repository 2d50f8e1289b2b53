"""`cascade-train publish`: real HTTP over a socket to a gateway served by uvicorn on a free port
(in a thread of this process, a fake teacher behind it), then /predict answers with the new
student version; refusals exit non-zero with the gateway's own message."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx2
import pytest

from cascade_server.bundle import Bundle
from cascade_server.gateway.app import create_app
from cascade_server.settings import Settings
from cascade_server.train.cli import main
from cascade_server.triton import free_port

from ..conftest import b64, png_bytes
from .conftest import TOKEN, FakeTeacher


@contextmanager
def live_gateway(demo, state: Path):
    import uvicorn

    teacher = FakeTeacher()
    settings = Settings(bundles=[demo.bundle], state_dir=state, admin_token=TOKEN)
    app = create_app(settings, teacher_factory=lambda s, b: teacher)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            assert thread.is_alive(), "the gateway stopped while starting"
            assert time.monotonic() < deadline, "the gateway is not ready within 60 s"
            try:
                if httpx2.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive()


def copy_bundle(demo, path: Path, **changes) -> Path:
    shutil.copytree(demo.bundle, path)
    raw = json.loads((path / "manifest.json").read_text())
    raw.update(changes)
    (path / "manifest.json").write_text(json.dumps(raw))
    return path


def publish(capsys, *args: object) -> tuple[int, dict | None, str]:
    code = main(["publish", *map(str, args)])
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else None, err


def served_version(url: str, demo) -> str:
    payload = {"image": b64(png_bytes(demo.images[0]))}
    r = httpx2.post(f"{url}/predict", json=payload, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["versions"]["student"]


def test_publish_swaps_the_live_gateway_and_waits_for_the_new_version(
    demo, tmp_path, capsys, monkeypatch
):
    live = Bundle.load(demo.bundle).manifest.version
    v2 = copy_bundle(demo, tmp_path / "v2", version="digits-v2")
    monkeypatch.setenv("CASCADE_ADMIN_TOKEN", TOKEN)
    with live_gateway(demo, tmp_path / "state") as url:
        assert served_version(url, demo) == live
        code, result, err = publish(capsys, v2, "--gateway", url, "--timeout", "30")
        assert code == 0, err
        assert result is not None
        assert (result["version"], result["previous"]) == ("digits-v2", live)
        assert result["cascade"] == "digits" and result["changed"] is True
        assert result["bundle"] == str(v2.resolve())
        assert served_version(url, demo) == "digits-v2"
        assert TOKEN not in err

        # Publishing what is served changes nothing and says so.
        code, again, _ = publish(capsys, v2, "--gateway", url)
        assert code == 0 and again is not None
        assert again["changed"] is False and again["previous"] == "digits-v2"

        # --path-on-gateway: the directory as the gateway sees it (here: a link to another).
        v3 = copy_bundle(demo, tmp_path / "v3", version="digits-v3")
        elsewhere = tmp_path / "mounted-v3"
        elsewhere.symlink_to(v3)
        code, result, err = publish(capsys, v3, "--gateway", url, "--path-on-gateway", elsewhere)
        assert code == 0, err
        assert result is not None and result["previous"] == "digits-v2"
        assert served_version(url, demo) == "digits-v3"


def test_publish_refusals_exit_non_zero_with_the_gateways_message(
    demo, tmp_path, capsys, monkeypatch
):
    live = Bundle.load(demo.bundle).manifest.version
    v2 = copy_bundle(demo, tmp_path / "v2", version="digits-v2")
    other = copy_bundle(demo, tmp_path / "other", name="other", version="other-v1")
    with live_gateway(demo, tmp_path / "state") as url:
        monkeypatch.delenv("CASCADE_ADMIN_TOKEN", raising=False)
        code, _, err = publish(capsys, v2, "--gateway", url)
        assert code == 2 and "set CASCADE_ADMIN_TOKEN" in err

        monkeypatch.setenv("CASCADE_ADMIN_TOKEN", "not-the-token")
        code, _, err = publish(capsys, v2, "--gateway", url)
        assert code == 1 and "403" in err and "the admin token is not valid" in err
        assert "not-the-token" not in err

        monkeypatch.setenv("CASCADE_ADMIN_TOKEN", TOKEN)
        # Another cascade's bundle, named for this one: the gateway's 422, quoted.
        code, _, err = publish(capsys, other, "--gateway", url, "--cascade", "digits")
        assert code == 1 and "422" in err
        assert "cannot replace cascade 'digits': its name differs" in err
        # ... or for its own name, which this gateway does not serve: its 404.
        code, _, err = publish(capsys, other, "--gateway", url)
        assert code == 1 and "404" in err and "other" in err
        # A path the gateway cannot read.
        code, _, err = publish(capsys, v2, "--gateway", url, "--path-on-gateway", "/nowhere/v2")
        assert code == 1 and "cannot be loaded" in err
        assert served_version(url, demo) == live

    code, _, err = publish(capsys, v2, "--gateway", f"http://127.0.0.1:{free_port()}")
    assert code == 1 and "unreachable" in err and "refused" in err.lower()


def test_publish_gives_up_on_a_gateway_that_does_not_answer(demo, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CASCADE_ADMIN_TOKEN", TOKEN)
    v2 = copy_bundle(demo, tmp_path / "v2", version="digits-v2")
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        port = silent.getsockname()[1]
        started = time.monotonic()
        code, _, err = publish(capsys, v2, "--gateway", f"http://127.0.0.1:{port}", "--timeout", 1)
    assert code == 1 and "no answer within" in err
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("bundle", ["missing", "not-a-bundle"])
def test_publish_needs_a_bundle_here(tmp_path, capsys, monkeypatch, bundle):
    monkeypatch.setenv("CASCADE_ADMIN_TOKEN", TOKEN)
    (tmp_path / "not-a-bundle").mkdir()
    code, _, err = publish(capsys, tmp_path / bundle, "--gateway", "http://127.0.0.1:9")
    assert code == 2 and "is not a bundle" in err
