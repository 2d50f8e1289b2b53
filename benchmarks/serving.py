"""Side-by-side serving benchmark, one run, ratios printed (see benchmarks/README.md).

    python benchmarks/serving.py                 # ~12 min on 2 cores: 3 interleaved reps
    python benchmarks/serving.py --reps 1 --seconds 4 --workers 1    # a quick look

What runs, on this machine, against 1000 Fashion-MNIST test images as base64 PNG:
- echo: a bare FastAPI app parsing the same JSON bodies (the framework's floor);
- the gateway (`cascade-serve`, 1 and 2 workers): student only (threshold 0), the cascade at
  10/20/30% delegation (target rates through the admin API), teacher only (threshold 1);
- the same 1-worker gateway with tracing on (every request sampled, spans exported over
  OTLP/HTTP to a sink in this process): what traces cost;
- the teacher called directly on Triton: wrk on Triton's HTTP endpoint (batch 1, JSON tensors,
  same concurrency: the same C client as every other row), and the Python grpc.aio client for
  comparison (its tail is its own: see benchmarks/README.md);
- a Triton-only cascade (benchmarks/bls/model.py) built from the same bundle: what users would
  build instead, behind Triton's C++ HTTP front end, at the same thresholds.
Peak throughput comes from wrk (closed loop, 16 connections); latency at concurrency 1 and the
p99 at 70% of the cascade's peak (wrk paced with a per-connection delay) come after.
The cascade (ResNet-20 teacher, MLP-16 student) is built by cascade-train from
configs/fashion_mnist/serving.yaml on first use (a few minutes).
"""

from __future__ import annotations

import argparse
import base64
import gzip
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cascade_server.bundle import Bundle  # noqa: E402
from cascade_server.preprocess import normalize  # noqa: E402
from cascade_server.triton import (  # noqa: E402
    TritonServer,
    free_port,
    python_backend_repository,
    read_model_config,
    write_model_config,
)

CONFIG = ROOT / "configs" / "fashion_mnist" / "serving.yaml"
DATA = ROOT.parent / "shared" / "data" / "fashion_mnist"
TOKEN = "bench-token"
BLS = "fashion_bls"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_cascade(work: Path) -> tuple[Path, Path]:
    bundle, repo = work / "bundles" / "fashion", work / "model_repository"
    if not (bundle / "manifest.json").is_file():
        log("building the Fashion-MNIST cascade with cascade-train (a few minutes)")
        subprocess.run(
            [
                str(Path(sys.executable).parent / "cascade-train"),
                "--no-progress",
                "run",
                str(CONFIG),
                "--export",
                "--run-dir",
                str(work / "run"),
                "--bundles",
                str(work / "bundles"),
                "--repository",
                str(repo),
            ],
            check=True,
            cwd=ROOT,
        )
    return bundle, repo


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path) as fh:
        data = fh.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def payloads(work: Path, bundle: Bundle, n: int) -> dict[str, Path]:
    """Body files for wrk (one per line) and the preprocessed tensors for the direct client."""
    out = work / "payloads"
    out.mkdir(parents=True, exist_ok=True)
    images = read_idx(DATA / "t10k-images-idx3-ubyte.gz")[:n]
    encoded = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img, "L").save(buf, "PNG")
        encoded.append(base64.b64encode(buf.getvalue()).decode())
    files = {"gateway": out / "gateway.jsonl", "tensors": out / "tensors.npy"}
    files["gateway"].write_text("".join(json.dumps({"image": e}) + "\n" for e in encoded))
    np.save(files["tensors"], normalize(images[:, :, :, None], bundle.manifest.preprocess))
    return files


def teacher_bodies(work: Path, tensors: Path, input_name: str) -> Path:
    """One Open Inference Protocol request per preprocessed image, for wrk against Triton."""
    path = work / "payloads" / "teacher.jsonl"
    x = np.load(tensors)
    lines = []
    for image in x:
        body = {
            "inputs": [
                {
                    "name": input_name,
                    "shape": [1, *image.shape],
                    "datatype": "FP32",
                    "data": np.round(image.ravel(), 5).tolist(),
                }
            ]
        }
        lines.append(json.dumps(body))
    path.write_text("\n".join(lines) + "\n")
    return path


def bls_bodies(work: Path, encoded_file: Path, threshold: float) -> Path:
    path = work / "payloads" / f"bls-{threshold:.6f}.jsonl"
    lines = []
    for line in encoded_file.read_text().splitlines():
        image = json.loads(line)["image"]
        body = {
            "inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": [image]}],
            "parameters": {"threshold": threshold},
        }
        lines.append(json.dumps(body))
    path.write_text("\n".join(lines) + "\n")
    return path


def triton_repository(work: Path, repo: Path, bundle: Bundle) -> Path:
    """The bundled Triton's repository (teacher), plus the BLS cascade model."""
    from tritonclient.grpc import model_config_pb2

    target = python_backend_repository(repo.resolve(), work / "triton" / "repository")
    teacher = bundle.manifest.teacher
    bls = target / BLS
    (bls / "1").mkdir(parents=True)
    shutil.copy(ROOT / "benchmarks" / "bls" / "model.py", bls / "1" / "model.py")
    config = model_config_pb2.ModelConfig()
    config.name, config.backend, config.max_batch_size = BLS, "python", teacher.max_batch_size
    inp = config.input.add()
    inp.name, inp.data_type = "image", model_config_pb2.TYPE_STRING
    inp.dims.append(1)
    for name, dtype in (
        ("class_id", model_config_pb2.TYPE_INT64),
        ("margin", model_config_pb2.TYPE_FP32),
        ("by_teacher", model_config_pb2.TYPE_BOOL),
    ):
        out = config.output.add()
        out.name, out.data_type = name, dtype
        out.dims.append(1)
    group = config.instance_group.add()
    group.count, group.kind = 1, model_config_pb2.ModelInstanceGroup.KIND_CPU
    config.dynamic_batching.max_queue_delay_microseconds = 0
    for key, value in {
        "student_onnx": str(bundle.student_path.resolve()),
        "manifest": str((bundle.path / "manifest.json").resolve()),
        "teacher_model": teacher.model_name,
    }.items():
        config.parameters[key].string_value = value
    write_model_config(config, bls / "config.pbtxt")
    # Same settings as production's teacher config, read back to check it parses.
    read_model_config(target / teacher.model_name / "config.pbtxt")
    return target


def wait_http(url: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


@contextmanager
def process(cmd: list[str], env: dict[str, str], log_path: Path, ready_url: str, cwd: Path = ROOT):
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    try:
        wait_http(ready_url)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def admin(url: str, method: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(
        f"{url}/admin/threshold",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"authorization": f"Bearer {TOKEN}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def outcome_counts(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    counts: dict[str, float] = {}
    pattern = r'cascade_items_total\{cascade="fashion",outcome="(\w+)"\} (\S+)'
    for m in re.finditer(pattern, text):
        counts[m.group(1)] = float(m.group(2))
    return counts


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


@contextmanager
def otlp_sink():
    """An OTLP/HTTP endpoint that accepts and drops every export (a collector elsewhere)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def wrk(url: str, bodies: Path, seconds: float, connections: int, delay_ms: float = 0) -> dict:
    env = {**os.environ, "BODIES": str(bodies), "DELAY_MS": str(delay_ms)}
    cmd = [
        "wrk",
        f"-t{min(2, connections)}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--latency",
        "-s",
        str(ROOT / "benchmarks" / "post.lua"),
        url,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"wrk failed: {done.stderr or done.stdout}")
    out = done.stdout
    result = {"requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        result[f"p{pct}_ms"] = float(m.group(1)) * _UNITS[m.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    result["non_2xx"] = int(errors.group(1)) if errors else 0
    if socket_errors:
        result["socket_errors"] = socket_errors.group(1)
    return result


def ideal(d: float, x_student: float, x_teacher: float) -> float:
    return 1.0 / ((1 - d) / x_student + d / x_teacher)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "serving")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serving.json")
    p.add_argument("--no-tracing", action="store_true", help="skip the traced gateway")
    p.add_argument(
        "--baseline-tree",
        type=Path,
        help="another checkout (e.g. a git worktree of an earlier commit) whose gateway runs "
        "beside this one, 1 worker, interleaved in every rep: a same-sitting A/B",
    )
    args = p.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is missing: apt-get install wrk")

    work = args.work.resolve()
    bundle_dir, repo = build_cascade(work)
    bundle = Bundle.load(bundle_dir)
    files = payloads(work, bundle, args.images)
    triton_repo = triton_repository(work, repo, bundle)
    bin_dir = Path(sys.executable).parent
    results: dict[str, list[dict]] = {}

    def record(name: str, result: dict) -> None:
        results.setdefault(name, []).append(result)
        log(f"{name}: {result['requests_per_s']:.0f} req/s, p50 {result['p50_ms']:.2f} ms")

    with ExitStack() as stack:
        triton = stack.enter_context(TritonServer(triton_repo, work / "triton"))
        echo_port = free_port()
        stack.enter_context(
            process(
                [
                    str(bin_dir / "uvicorn"),
                    "benchmarks.echo_app:app",
                    "--port",
                    str(echo_port),
                    "--no-access-log",
                    "--log-level",
                    "warning",
                ],
                dict(os.environ),
                work / "echo.log",
                f"http://127.0.0.1:{echo_port}/docs",
            )
        )
        gateways: dict[int | str, str] = {}
        variants: list[tuple[int | str, int, dict[str, str]]] = [(w, w, {}) for w in args.workers]
        if not args.no_tracing:
            sink = stack.enter_context(otlp_sink())
            variants.append(("traced", 1, {"CASCADE_TRACING__ENDPOINT": sink}))
        if args.baseline_tree:
            baseline = args.baseline_tree.resolve()
            variants.append(("baseline", 1, {"PYTHONPATH": str(baseline)}))
        for key, workers, extra in variants:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            env = {
                **os.environ,
                "CASCADE_ADMIN_TOKEN": TOKEN,
                "CASCADE_STATE_DIR": str(work / f"state-{key}"),
                "CASCADE_LOG_LEVEL": "warning",
                **extra,
            }
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
            stack.enter_context(
                process(
                    [
                        sys.executable,
                        "-m",
                        "cascade_server.serve",
                        "--bundle",
                        str(bundle_dir),
                        "--triton-url",
                        triton.grpc_url,
                        "--workers",
                        str(workers),
                        "--port",
                        str(port),
                        "--workdir",
                        str(work / f"gateway-{key}"),
                    ],
                    env,
                    work / f"gateway-{key}.log",
                    f"{url}/readyz",
                    cwd=baseline if key == "baseline" else ROOT,
                )
            )
            gateways[key] = url

        # The BLS baseline runs at the gateway's thresholds for the same delegation rates.
        first = gateways[args.workers[0]]
        thresholds = {"student": 0.0, "teacher": 1.0}
        for rate in args.rates:
            thresholds[f"cascade@{rate:.0%}"] = admin(
                first, "PUT", {"target_delegation_rate": rate}
            )["threshold"]
        bls = {name: bls_bodies(work, files["gateway"], t) for name, t in thresholds.items()}
        bls_url = f"{triton.http_url}/v2/models/{BLS}/infer"
        teacher_model = bundle.manifest.teacher.model_name
        teacher_url = f"{triton.http_url}/v2/models/{teacher_model}/infer"
        files["teacher"] = teacher_bodies(
            work, files["tensors"], bundle.manifest.teacher.input_name
        )
        direct_cmd = [
            sys.executable,
            str(ROOT / "benchmarks" / "direct_teacher.py"),
            "--url",
            triton.grpc_url,
            "--model",
            bundle.manifest.teacher.model_name,
            "--inputs",
            str(files["tensors"]),
            "--concurrency",
            str(args.connections),
            "--seconds",
            str(args.seconds),
        ]

        def gateway_run(
            workers: int | str,
            name: str,
            threshold: float,
            c: int = args.connections,
            delay_ms: float = 0,
        ) -> dict:
            url = gateways[workers]
            admin(url, "PUT", {"threshold": threshold})
            before = outcome_counts(url)
            result = wrk(f"{url}/predict", files["gateway"], args.seconds, c, delay_ms)
            after = outcome_counts(url)
            diff = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            answered = sum(diff.values())
            kept = ("confident", "forced_student")
            delegated = sum(v for k, v in diff.items() if k not in kept)
            degraded = diff.get("teacher_failed", 0) + diff.get("circuit_open", 0)
            result["delegation"] = delegated / answered if answered else 0.0
            result["degraded"] = degraded / answered if answered else 0.0
            return result

        log("warm-up")
        for key in gateways:
            gateway_run(key, "warm", thresholds["cascade@20%"])
        wrk(bls_url, bls["cascade@20%"], 2, args.connections)
        wrk(teacher_url, files["teacher"], 2, args.connections)

        for rep in range(args.reps):
            log(f"rep {rep + 1}/{args.reps}")
            record(
                "echo",
                wrk(
                    f"http://127.0.0.1:{echo_port}/predict",
                    files["gateway"],
                    args.seconds,
                    args.connections,
                ),
            )
            for workers in args.workers:
                for name, threshold in thresholds.items():
                    record(f"gateway-{workers}w {name}", gateway_run(workers, name, threshold))
            if "traced" in gateways:
                for name in ("student", "cascade@20%"):
                    record(f"traced-1w {name}", gateway_run("traced", name, thresholds[name]))
            if "baseline" in gateways:
                for name in ("student", "cascade@20%", "teacher"):
                    record(f"gateway-1w {name}", gateway_run(1, name, thresholds[name]))
                    record(f"baseline-1w {name}", gateway_run("baseline", name, thresholds[name]))
            record(
                "teacher direct (wrk, HTTP)",
                wrk(teacher_url, files["teacher"], args.seconds, args.connections),
            )
            out = subprocess.run(direct_cmd, capture_output=True, text=True, check=True).stdout
            record("teacher direct (grpc.aio)", json.loads(out.strip().splitlines()[-1]))
            # What a user who can batch does: 16 images per call, 4 calls in flight (the
            # gateway batches too). Fewer calls, so fewer meet the bundled server's stalls.
            batched = [
                *direct_cmd[:-4],
                "--concurrency",
                "4",
                "--batch",
                "16",
                "--seconds",
                str(args.seconds),
            ]
            out = subprocess.run(batched, capture_output=True, text=True, check=True).stdout
            record("teacher direct (grpc.aio, batch 16)", json.loads(out.strip().splitlines()[-1]))
            for name in thresholds:
                record(f"bls {name}", wrk(bls_url, bls[name], args.seconds, args.connections))

        log("latency at concurrency 1")
        w1 = args.workers[0]
        for _ in range(args.reps):
            record("c1 gateway student", gateway_run(w1, "student", 0.0, c=1))
            record("c1 gateway teacher", gateway_run(w1, "teacher", 1.0, c=1))
            record("c1 teacher direct", wrk(teacher_url, files["teacher"], args.seconds, 1))

        log("p99 at 70% of the cascade's peak (paced wrk)")
        peak = statistics.median(r["requests_per_s"] for r in results[f"gateway-{w1}w cascade@20%"])
        p50 = statistics.median(r["p50_ms"] for r in results[f"gateway-{w1}w cascade@20%"])
        delay = max(args.connections / (0.7 * peak) * 1e3 - p50, 0.1)
        for _ in range(args.reps):
            record(
                "paced 70% cascade@20%",
                gateway_run(w1, "paced", thresholds["cascade@20%"], delay_ms=delay),
            )
        admin(first, "DELETE")

    summary = summarize(results, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": results, "summary": summary}, indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0


def summarize(results: dict[str, list[dict]], args: argparse.Namespace) -> dict:
    med = {
        k: {f: statistics.median(r[f] for r in v) for f in v[0] if isinstance(v[0][f], float)}
        for k, v in results.items()
    }
    print("\n| setting | req/s | p50 ms | p99 ms | delegation |")
    print("|---|---|---|---|---|")
    for name, m in med.items():
        d = m.get("delegation")
        print(
            f"| {name} | {m['requests_per_s']:,.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} | "
            f"{'' if d is None else f'{d:.1%}'} |"
        )
    x = {k: m["requests_per_s"] for k, m in med.items()}
    ratios: dict[str, float] = {}
    for w in args.workers:
        g = f"gateway-{w}w"
        ratios[f"{w}w cascade@20% / bls cascade@20%"] = x[f"{g} cascade@20%"] / x["bls cascade@20%"]
        ratios[f"{w}w student / bls student"] = x[f"{g} student"] / x["bls student"]
        ratios[f"{w}w student / echo"] = x[f"{g} student"] / x["echo"]
        direct = x["teacher direct (grpc.aio, batch 16)"]
        ratios[f"{w}w teacher / teacher direct (batch 16)"] = x[f"{g} teacher"] / direct
        for rate in args.rates:
            name = f"{g} cascade@{rate:.0%}"
            d = med[name]["delegation"]
            ratios[f"{w}w cascade@{rate:.0%} / ideal"] = x[name] / ideal(
                d, x[f"{g} student"], x[f"{g} teacher"]
            )
    if "baseline-1w student" in x:
        for name in ("student", "cascade@20%", "teacher"):
            ratios[f"1w / baseline 1w, {name}"] = x[f"gateway-1w {name}"] / x[f"baseline-1w {name}"]
    if "traced-1w student" in x:
        for name in ("student", "cascade@20%"):
            ratios[f"1w traced / untraced, {name}"] = (
                x[f"traced-1w {name}"] / x[f"gateway-{args.workers[0]}w {name}"]
            )
    ratios["teacher hop over direct, c=1 p50 (ms)"] = (
        med["c1 gateway teacher"]["p50_ms"]
        - med["c1 gateway student"]["p50_ms"]
        - med["c1 teacher direct"]["p50_ms"]
    )
    paced = med["paced 70% cascade@20%"]
    ratios["paced 70%: p99 / p50"] = paced["p99_ms"] / paced["p50_ms"]
    print("\n| ratio (medians of this run) | value |")
    print("|---|---|")
    for name, value in ratios.items():
        print(f"| {name} | {value:.2f} |")
    return {"medians": med, "ratios": ratios}


if __name__ == "__main__":
    raise SystemExit(main())
