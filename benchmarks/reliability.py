"""Fault tests under load: the real gateway (`cascade-serve`, 1 worker) and a real bundled
`tritonserver`, driven by loadtests/driver.py (bounded, closed loop), one scenario at a time:

    python benchmarks/reliability.py                 # about 3 minutes on 2 cores
    python benchmarks/reliability.py --write docs/reliability.md

- healthy: the baseline;
- hung: Triton stopped (SIGSTOP) for 6 s, then continued;
- killed: Triton killed (SIGKILL), restarted on the same ports 3 s later;
- slow: a teacher that takes 1.5 s per batch (past the 1 s deadline), for the whole run;
- overload: 3x more clients than the worker admits (CASCADE_MAX_IN_FLIGHT);
- swap: the student hot-swapped to another version through the admin API;
- sigterm: SIGTERM to the gateway with a 2 s drain.
For each: requests sent, answered (normal / degraded), refused (503 with Retry-After), lost
(timeouts, dropped connections), refused at connect (after shutdown), unhandled 5xx, p50/p99,
and seconds until the teacher answered again. Payloads: the digits demo at 20% delegation.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cascade_server.triton import (  # noqa: E402
    TritonServer,
    free_port,
    python_backend_repository,
)
from loadtests.driver import Run, drive, recovery_seconds  # noqa: E402

TOKEN = "reliability-token"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def demo(work: Path) -> tuple[Path, Path]:
    bundles, repo = work / "bundles", work / "model_repository"
    if not (bundles / "digits" / "manifest.json").is_file():
        train = Path(sys.executable).parent / "cascade-train"
        cmd = [str(train), "--no-progress", "demo", "--bundles", str(bundles),
               "--repository", str(repo)]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=ROOT)
    return bundles / "digits", repo


def payloads(n: int = 300) -> list[dict[str, str]]:
    from sklearn.datasets import load_digits

    images = load_digits().images[:n]
    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray((img * 16).clip(0, 255).astype(np.uint8)).save(buf, "PNG")
        out.append({"image": base64.b64encode(buf.getvalue()).decode()})
    return out


class Gateway:
    def __init__(self, bundle: Path, triton_url: str, work: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / f"gateway-{self.port}.log"
        environ = {
            **os.environ,
            "CASCADE_ADMIN_TOKEN": TOKEN,
            "CASCADE_STATE_DIR": str(work / "state"),
            "CASCADE_LOG_LEVEL": "warning",
            "CASCADE_TEACHER_TIMEOUT_S": "1.0",
            **env,
        }
        environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        cmd = [sys.executable, "-m", "cascade_server.serve", "--bundle", str(bundle),
               "--triton-url", triton_url, "--port", str(self.port), "--workdir",
               str(work / f"gw-{self.port}")]  # fmt: skip
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(cmd, env=environ, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/readyz?teacher=optional", timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(self.log.read_text())

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def row(name: str, run: Run, recover: float | None, note: str = "") -> dict:
    s = run.summary()
    s.update(scenario=name, recover_s=recover, note=note)
    return s


def scenario_healthy(ctx) -> dict:
    gw = Gateway(ctx.bundle, ctx.triton.grpc_url, ctx.work)
    try:
        run = asyncio.run(drive(f"{gw.url}/predict", ctx.payloads, concurrency=ctx.c,
                                seconds=ctx.seconds))  # fmt: skip
    finally:
        gw.stop()
    return row("healthy", run, 0.0)


def scenario_hung(ctx) -> dict:
    gw = Gateway(ctx.bundle, ctx.triton.grpc_url, ctx.work)
    pgid = ctx.triton.process.pid
    events = [(3.0, lambda: os.killpg(pgid, signal.SIGSTOP)),
              (9.0, lambda: os.killpg(pgid, signal.SIGCONT))]  # fmt: skip
    try:
        run = asyncio.run(drive(f"{gw.url}/predict", ctx.payloads, concurrency=ctx.c,
                                seconds=ctx.seconds, events=events))  # fmt: skip
    finally:
        os.killpg(pgid, signal.SIGCONT)
        gw.stop()
    during = run.window(3.0, 9.0).summary()
    note = (f"during the 6 s hang: {during['throughput_rps']:.0f} req/s answered, "
            f"p99 {during['p99_ms']:.0f} ms, {during['degraded']} degraded")  # fmt: skip
    return row("Triton hung 6 s (SIGSTOP)", run, recovery_seconds(run, 9.0), note)


def scenario_killed(ctx) -> dict:
    gw = Gateway(ctx.bundle, ctx.triton.grpc_url, ctx.work,
                 CASCADE_TEACHER_RECONNECT_BACKOFF_MS="250")  # fmt: skip
    triton = ctx.triton

    def restart() -> None:
        triton.start()

    events = [(3.0, triton.kill), (6.0, restart)]
    try:
        run = asyncio.run(drive(f"{gw.url}/predict", ctx.payloads, concurrency=ctx.c,
                                seconds=ctx.seconds, events=events))  # fmt: skip
    finally:
        gw.stop()
        # Restarted from the driver's helper thread, that Triton would get SIGTERM when the
        # thread ends (PR_SET_PDEATHSIG follows the thread); replace it from the main thread.
        triton.stop()
        triton.start()
    return row("Triton killed, restarted 3 s later", run, recovery_seconds(run, 6.0),
               "recovery counted from the restart (Triton needs ~2.5 s to be ready)")  # fmt: skip


def scenario_slow(ctx) -> dict:
    slow_repo = python_backend_repository(ctx.repo, ctx.work / "slow" / "repository",
                                          delay_ms=1500)  # fmt: skip
    with TritonServer(slow_repo, ctx.work / "slow") as slow:
        gw = Gateway(ctx.bundle, slow.grpc_url, ctx.work)
        try:
            run = asyncio.run(drive(f"{gw.url}/predict", ctx.payloads, concurrency=ctx.c,
                                    seconds=ctx.seconds))  # fmt: skip
        finally:
            gw.stop()
    return row("teacher slow (1.5 s > 1 s deadline)", run, None,
               "the breaker opens after 5 timeouts; a probe every 2 s")  # fmt: skip


def scenario_overload(ctx) -> dict:
    limit = ctx.c
    gw = Gateway(ctx.bundle, ctx.triton.grpc_url, ctx.work, CASCADE_MAX_IN_FLIGHT=str(limit))
    try:
        run = asyncio.run(drive(f"{gw.url}/predict", ctx.payloads, concurrency=3 * limit,
                                seconds=ctx.seconds))  # fmt: skip
    finally:
        gw.stop()
    return row(f"overload: {3 * limit} clients, {limit} admitted", run, 0.0)


def scenario_sigterm(ctx) -> dict:
    gw = Gateway(ctx.bundle, ctx.triton.grpc_url, ctx.work, CASCADE_DRAIN_S="2")
    ready_after: list[tuple[float, int]] = []

    def watch_readiness() -> None:
        t0 = time.perf_counter()
        while gw.process.poll() is None and time.perf_counter() - t0 < 6:
            try:
                with urllib.request.urlopen(f"{gw.url}/readyz?teacher=optional", timeout=1) as r:
                    code = r.status
            except urllib.error.HTTPError as exc:
                code = exc.code
            except OSError:
                code = 0
            ready_after.append((time.perf_counter() - t0, code))
            time.sleep(0.1)

    events = [(3.0, lambda: gw.process.send_signal(signal.SIGTERM)), (3.0, watch_readiness)]
    try:
        run = asyncio.run(drive(f"{gw.url}/predict", ctx.payloads, concurrency=ctx.c,
                                seconds=ctx.seconds, events=events))  # fmt: skip
    finally:
        code = gw.stop()
    not_ready = next((t for t, c in ready_after if c == 503), None)
    answered_after = sum(1 for r in run.records if r.status == 200 and r.start >= 3.0)
    note = (f"readiness 503 after {not_ready:.1f} s; {answered_after} answered after SIGTERM; "
            f"exit code {code}") if not_ready is not None else f"exit code {code}"  # fmt: skip
    return row("SIGTERM, 2 s drain", run, None, note)


def scenario_swap(ctx) -> dict:
    import shutil

    v2 = ctx.work / "bundle-v2"
    shutil.rmtree(v2, ignore_errors=True)
    shutil.copytree(ctx.bundle, v2)
    manifest = json.loads((v2 / "manifest.json").read_text())
    manifest["version"] = "swapped-v2"
    (v2 / "manifest.json").write_text(json.dumps(manifest))
    gw = Gateway(ctx.bundle, ctx.triton.grpc_url, ctx.work)
    took: list[float] = []

    def swap() -> None:
        t0 = time.perf_counter()
        req = urllib.request.Request(
            f"{gw.url}/admin/student", data=json.dumps({"bundle": str(v2)}).encode(),
            method="PUT", headers={"authorization": f"Bearer {TOKEN}",
                                   "content-type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200
        took.append(time.perf_counter() - t0)

    try:
        run = asyncio.run(drive(f"{gw.url}/predict", ctx.payloads, concurrency=ctx.c,
                                seconds=ctx.seconds, events=[(5.0, swap)]))  # fmt: skip
    finally:
        gw.stop()
        shutil.rmtree(ctx.work / "state", ignore_errors=True)  # the next scenarios serve v1
    note = f"swap call took {took[0]:.2f} s" if took else "swap failed"
    return row("hot swap of the student", run, None, note)


SCENARIOS = {
    "healthy": scenario_healthy,
    "hung": scenario_hung,
    "killed": scenario_killed,
    "slow": scenario_slow,
    "overload": scenario_overload,
    "swap": scenario_swap,
    "sigterm": scenario_sigterm,
}


def table(rows: list[dict]) -> str:
    head = ("| scenario | sent | answered (degraded) | refused 503+Retry-After | lost | "
            "refused at connect | 5xx | p50 ms | p99 ms | recover s | notes |")  # fmt: skip
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        p50 = "" if r["p50_ms"] is None else f"{r['p50_ms']:.1f}"
        p99 = "" if r["p99_ms"] is None else f"{r['p99_ms']:.1f}"
        rec = "" if r["recover_s"] is None else f"{r['recover_s']}"
        lines.append(
            f"| {r['scenario']} | {r['sent']} | {r['answered']} ({r['degraded']}) | "
            f"{r['refused']} ({r['refused_with_retry_after']}) | {r['lost']} | "
            f"{r['refused_connect']} | {r['failed_5xx']} | {p50} | {p99} | {rec} | {r['note']} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "reliability")
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    p.add_argument("--write", type=Path, help="replace the results table in this markdown file")
    args = p.parse_args()

    work = args.work.resolve()
    bundle, repo = demo(work)

    class Ctx:
        pass

    ctx = Ctx()
    ctx.work, ctx.bundle, ctx.repo = work, bundle, repo.resolve()
    ctx.payloads, ctx.seconds, ctx.c = payloads(), args.seconds, args.concurrency
    triton_repo = python_backend_repository(ctx.repo, work / "triton" / "repository")
    rows = []
    with TritonServer(triton_repo, work / "triton") as triton:
        ctx.triton = triton
        for name in args.scenarios:
            log(f"scenario {name}")
            rows.append(SCENARIOS[name](ctx))
            log(json.dumps(rows[-1]))
    text = table(rows)
    print(text)
    (work / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    if args.write:
        doc = args.write.read_text()
        start, end = "<!-- results -->", "<!-- /results -->"
        before, _, rest = doc.partition(start)
        _, _, after = rest.partition(end)
        args.write.write_text(f"{before}{start}\n{text}\n{end}{after}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
