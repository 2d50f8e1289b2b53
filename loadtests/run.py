"""Headless load test: locust against a running gateway, then one JSON summary and a plot.

    python -m loadtests.run --host http://127.0.0.1:8000 --users 16 --duration 30s \
        --image-data digits --text-data intents --out runs/loadtest

Writes OUT/locust_*.csv (locust's own), OUT/summary.json (throughput, p50/p95/p99, delegation
and degraded rates, accuracy against the labels, errors; per user kind and overall) and
OUT/loadtest.png (throughput and latency over time). Locust runs in its own process (it
monkey-patches threading) and costs about a core at 3k req/s: for peak throughput use wrk
(benchmarks/serving.py); use this for scenarios, mixes and accuracy under load.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="loadtests.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host", default="http://127.0.0.1:8000")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--spawn-rate", type=float, default=16)
    p.add_argument("--duration", default="30s", help="locust's --run-time (30s, 2m, ...)")
    p.add_argument("--image-data", default="fashion_mnist", help="payload source; '' for none")
    p.add_argument("--text-data", default="banking77", help="payload source; '' for none")
    p.add_argument("--image-cascade", default="", help="cascade name (default: by modality)")
    p.add_argument("--text-cascade", default="")
    p.add_argument("--image-weight", type=int, default=1)
    p.add_argument("--text-weight", type=int, default=1)
    p.add_argument("--limit", type=int, default=1000, help="labelled payloads per source")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "loadtest")
    return p.parse_args(argv)


def run_locust(args: argparse.Namespace) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    counts = args.out / "counts.json"
    counts.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        "LOADTEST_IMAGE_DATA": args.image_data,
        "LOADTEST_TEXT_DATA": args.text_data,
        "LOADTEST_IMAGE_CASCADE": args.image_cascade,
        "LOADTEST_TEXT_CASCADE": args.text_cascade,
        "LOADTEST_IMAGE_WEIGHT": str(args.image_weight),
        "LOADTEST_TEXT_WEIGHT": str(args.text_weight),
        "LOADTEST_LIMIT": str(args.limit),
        "LOADTEST_SUMMARY": str(counts),
    }
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(ROOT / "loadtests" / "locustfile.py"),
        "--headless",
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.spawn_rate),
        "--run-time",
        args.duration,
        "--host",
        args.host,
        "--csv",
        str(args.out / "locust"),
        "--csv-full-history",
        "--only-summary",
        "--loglevel",
        "WARNING",
        "--exit-code-on-error",
        "0",
        "--stop-timeout",
        "10",
    ]
    subprocess.run(cmd, env=env, cwd=ROOT, check=True)
    return counts


def _float(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return float("nan")


def summarize(out: Path, counts_path: Path) -> dict:
    with open(out / "locust_stats.csv", newline="") as fh:
        rows = {row["Name"]: row for row in csv.DictReader(fh)}
    counts = json.loads(counts_path.read_text()) if counts_path.is_file() else {}

    def block(row: dict, c: dict) -> dict:
        answered = c.get("answered", 0)
        return {
            # Our own count of every answer (locust's CSV is written before the requests still
            # running at the stop have finished).
            "requests": answered + c.get("errors", 0) if c else int(row["Request Count"]),
            "failures": int(row["Failure Count"]),
            "throughput_rps": _float(row["Requests/s"]),
            "p50_ms": _float(row["50%"]),
            "p95_ms": _float(row["95%"]),
            "p99_ms": _float(row["99%"]),
            "answered": answered,
            "errors": c.get("errors", 0),
            "accuracy": c.get("correct", 0) / answered if answered else None,
            "delegation_rate": c.get("delegated", 0) / answered if answered else None,
            "degraded_rate": c.get("degraded", 0) / answered if answered else None,
        }

    summary = {"overall": block(rows["Aggregated"], _sum(counts.values()))}
    for kind, c in counts.items():
        row = rows.get(f"/predict [{kind}]")
        if row is not None:
            summary[kind] = block(row, c)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _sum(counters) -> dict:
    total: dict[str, int] = {}
    for c in counters:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


def plot(out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out / "locust_stats_history.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["Name"] == "Aggregated"]
    t0 = int(rows[0]["Timestamp"]) if rows else 0
    t = [int(r["Timestamp"]) - t0 for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(t, [_float(r["Requests/s"]) for r in rows], label="requests/s")
    top.plot(t, [_float(r["Failures/s"]) for r in rows], label="failures/s")
    top.set_ylabel("per second")
    top.legend()
    for pct in ("50%", "95%", "99%"):
        bottom.plot(t, [_float(r[pct]) for r in rows], label=f"p{pct[:-1]}")
    bottom.set_ylabel("latency, ms")
    bottom.set_xlabel("seconds")
    bottom.legend()
    fig.tight_layout()
    path = out / "loadtest.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = run_locust(args)
    summary = summarize(args.out, counts)
    plot(args.out)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
