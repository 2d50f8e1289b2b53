"""`cascade-serve --demo` (what `make serve` runs) and the README's curl commands, for real."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx2
import pytest

from .conftest import ROOT, serving

pytestmark = pytest.mark.e2e


def readme_curl_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("curl ")]


def tritonservers_under(path: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "tritonserver" in cmdline and str(path) in cmdline:
                pids.append(int(proc.name))
    return pids


def test_demo_serves_answers_the_readme_and_stops_cleanly(demo, text_demo, tmp_path):
    # Reuse the session's demo models: --demo must find them and not retrain.
    shutil.copytree(demo.repository, tmp_path / "model_repository")
    shutil.copytree(demo.bundle, tmp_path / "bundles" / "digits")
    shutil.copytree(text_demo.bundle, tmp_path / "bundles" / "intents")
    env = {k: v for k, v in os.environ.items() if k != "CASCADE_ADMIN_TOKEN"}
    env["CASCADE_STATE_DIR"] = str(tmp_path / "state")
    args = [
        "--demo",
        "--workers",
        "2",
        "--model-repository",
        str(tmp_path / "model_repository"),
        "--bundles-dir",
        str(tmp_path / "bundles"),
    ]
    with serving(args, tmp_path, env) as gw:
        output = gw.log.read_text()
        assert "reusing it" in output
        token = re.search(r"admin token \(demo\): (\S+)", output).group(1)
        assert tritonservers_under(tmp_path / "run")
        port = gw.url.rsplit(":", 1)[1]

        commands = readme_curl_commands()
        assert len(commands) >= 9
        answers = {}
        for command in commands:
            done = subprocess.run(
                ["bash", "-c", command.replace("127.0.0.1:8000", f"127.0.0.1:{port}")],
                cwd=ROOT,
                env={**env, "TOKEN": token},
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert done.returncode == 0, (command, done.stderr)
            body = json.loads(done.stdout)
            assert "error" not in body, (command, body)
            answers[command] = body

        def answer(fragment: str) -> dict:
            return next(body for command, body in answers.items() if fragment in command)

        # The admin hints the banner prints work as printed (one per cascade served).
        hints = re.findall(r"admin:\s+(curl .+)", output)
        assert len(hints) == 2, output
        for hint in hints:
            done = subprocess.run(["bash", "-c", hint], capture_output=True, text=True, timeout=30)
            assert done.returncode == 0 and "error" not in json.loads(done.stdout), (hint, done)

        # What the README says about each example is true.
        assert answer("digit-easy.png")["answered_by"] == "student"
        assert answer("digit-hard.png")["answered_by"] == "teacher"
        negation = answer("i did not lose my card")
        assert (negation["cascade"], negation["answered_by"]) == ("intents", "teacher")
        assert negation["label"] == "card_declined"
        assert answer("savings account balance")["cascade"] == "intents"
        assert answer("target_delegation_rate")["target_delegation_rate"] == 0.1
        assert {c["name"] for c in answer("/cascades")["cascades"]} == {"digits", "intents"}
    # serving() sent SIGINT, as Ctrl-C does, and waited for the exit.
    assert gw.process.returncode == 0, gw.log.read_text()[-3000:]
    assert "stopping tritonserver" in gw.log.read_text()
    assert tritonservers_under(tmp_path / "run") == []
    with pytest.raises(httpx2.TransportError):
        httpx2.get(f"{gw.url}/healthz", timeout=1)
