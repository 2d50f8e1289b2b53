"""Soak test: the real gateway (`cascade-serve`, Redis control store) and the bundled
`tritonserver` under steady load for 10+ minutes, while the control plane churns:

- a hot swap of the student every 30 s (alternating two versions),
- a threshold change every 20 s (a threshold, a target rate, back to the default, in turn),
- Redis killed and restarted (same port, same data) at a third of the run,
- Triton killed and restarted at two thirds.

Reported: resident memory, open file descriptors and asyncio tasks of the gateway worker at the
start (after warm-up) and the end, sampled every 30 s; requests sent, answered, degraded,
refused (503 with Retry-After), lost (timeouts, dropped connections: must be 0) and unhandled
5xx (must be 0); every control-plane event and its answer.

    python benchmarks/soak.py                     # 11 minutes (make soak)
    python benchmarks/soak.py --seconds 120       # a short smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.reliability import TOKEN, Gateway, demo, log, payloads  # noqa: E402
from cascade_server.triton import TritonServer, python_backend_repository  # noqa: E402
from loadtests.driver import drive  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402


def admin(url: str, method: str, path: str, body: dict | None = None) -> int:
    req = urllib.request.Request(
        f"{url}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def process_stats(pid: int, url: str) -> dict:
    """Resident memory and open descriptors from /proc; asyncio tasks from the metrics."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    tasks = next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("cascade_event_loop_tasks ")
    )
    return {"rss_mb": round(rss_kb / 1024, 1), "open_fds": fds, "asyncio_tasks": int(tasks)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "soak")
    p.add_argument("--seconds", type=float, default=660)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "soak.json")
    args = p.parse_args()

    work = args.work.resolve()
    bundle, repo = demo(work)
    v2 = work / "bundle-v2"
    shutil.rmtree(v2, ignore_errors=True)
    shutil.copytree(bundle, v2)
    manifest = json.loads((v2 / "manifest.json").read_text())
    manifest["version"] = "soak-v2"
    (v2 / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(work / "redis", ignore_errors=True)
    redis = RedisServer(work / "redis").start()
    triton_repo = python_backend_repository(repo.resolve(), work / "triton" / "repository")
    events: list[dict] = []
    samples: list[dict] = []
    triton = TritonServer(triton_repo, work / "triton").start()
    gw = Gateway(
        bundle,
        triton.grpc_url,
        work,
        CASCADE_CONTROL_STORE="redis",
        CASCADE_REDIS_URL=redis.url,
        CASCADE_TEACHER_RECONNECT_BACKOFF_MS="250",
        CASCADE_READINESS_INTERVAL_S="1",
    )
    url = gw.url
    started = time.perf_counter()

    def event(name: str, status: object) -> None:
        events.append({"at_s": round(time.perf_counter() - started, 1), "event": name,
                       "result": status})  # fmt: skip
        log(f"{name}: {status}")

    bundles = [v2, bundle]
    thresholds = [{"threshold": 0.5}, {"target_delegation_rate": 0.3}, None]

    def swap(i: int):
        target = bundles[i % 2]
        body = {"bundle": str(target)}
        return lambda: event(f"swap to {target.name}", admin(url, "PUT", "/admin/student", body))

    def threshold(i: int):
        body = thresholds[i % 3]
        if body is None:
            return lambda: event("threshold reset", admin(url, "DELETE", "/admin/threshold"))
        return lambda: event(f"threshold {body}", admin(url, "PUT", "/admin/threshold", body))

    def redis_restart() -> None:
        redis.kill()
        event("redis killed", "ok")
        time.sleep(3)
        redis.start()
        event("redis restarted", "ok")

    def triton_restart() -> None:
        triton.kill()
        event("triton killed", "ok")
        time.sleep(3)
        triton.start()
        event("triton restarted", "ok")

    def sample() -> None:
        stats = process_stats(gw.process.pid, url)
        stats["at_s"] = round(time.perf_counter() - started, 1)
        samples.append(stats)

    warmup = 20.0
    schedule = [(warmup - 1, sample)]
    t = warmup + 30
    i = 0
    while t < args.seconds - 10:
        schedule.append((t, swap(i)))
        i += 1
        t += 30
    t, i = warmup + 20, 0
    while t < args.seconds - 10:
        schedule.append((t, threshold(i)))
        i += 1
        t += 20
    schedule += [(args.seconds / 3, redis_restart), (2 * args.seconds / 3, triton_restart)]
    schedule += [(s, sample) for s in range(int(warmup) + 29, int(args.seconds), 30)]
    schedule.append((args.seconds - 0.5, sample))
    log(f"soak: {args.seconds:.0f} s, {args.concurrency} clients, {len(schedule)} events")
    try:
        load = drive(
            f"{url}/predict",
            payloads(),
            concurrency=args.concurrency,
            seconds=args.seconds,
            timeout_s=15,
            events=schedule,
        )
        run = asyncio.run(load)
    finally:
        code = gw.stop()
        triton.stop()
        redis.kill()
    summary = run.summary()
    first, last = samples[0], samples[-1]
    result = {
        "seconds": args.seconds,
        "concurrency": args.concurrency,
        "requests": summary,
        "start": first,
        "end": last,
        "samples": samples,
        "events": events,
        "gateway_exit_code": code,
        "lost": summary["lost"],
        "unhandled_5xx": summary["failed_5xx"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    shown = ("requests", "start", "end", "lost", "unhandled_5xx", "gateway_exit_code")
    print(json.dumps({k: result[k] for k in shown}, indent=2))
    failed = [e for e in events if e["result"] not in ("ok", 200)]
    if failed:
        print(f"control-plane calls not answered 200: {failed}")
    return 0 if summary["lost"] == 0 and summary["failed_5xx"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
