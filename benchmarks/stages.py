"""N-stage cascades, measured: B-DISTIL served as stages vs as one graph, and a three-stage
cascade (MLP student -> LeNet -> ResNet-20 teacher) vs the two-stage ones at the same accuracy.

    python benchmarks/stages.py                      # Fashion-MNIST (../shared/data), ~25 min
    python benchmarks/stages.py --dataset digits     # the demo digits, ~5 min

Every model is trained by cascade-train on first use (reused afterwards) against ONE teacher:
Fashion-MNIST's is the serving benchmark's ResNet-20 (configs/fashion_mnist/serving.yaml),
digits' the demo's CNN. Students: the MLP-16 of that config (KD), a LeNet (KD) and a B-DISTIL
ensemble of three MLP-16 members, exported twice (`export.anytime=tiers`: each member its own
graph, run only on what the members before it left unsure; `graph`: one graph, every member
for every item). `cascade-train compose` puts the MLP and the LeNet in one bundle, every
threshold calibrated at once on the validation split.

Two measures:
- offline, on the test split: each cascade's frontier (accuracy vs expected cost and teacher
  share); at each of five accuracies (teacher - 1 pt ... teacher + 0.1 pt) the least teacher
  share and the least expected cost each needs (the cheapest frontier row reaching it);
- live: a real gateway and the bundled Triton serving the test images (the same Python client,
  16 in flight, for every row), each cascade set through the admin API to the same
  `target_accuracy` (teacher - 0.2 pt; thresholds from its validation frontier): throughput,
  accuracy against the labels, teacher calls and the share answered by each stage.
Writes benchmarks/results/stages-<dataset>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import adaptive  # noqa: E402
from benchmarks.adaptive import closed_loop, gateway  # noqa: E402
from benchmarks.serving import DATA, build_cascade, read_idx  # noqa: E402
from cascade_server.bundle import Bundle, Frontier  # noqa: E402
from cascade_server.policy import softmax  # noqa: E402
from cascade_server.triton import TritonServer, python_backend_repository  # noqa: E402

TRAIN = str(Path(sys.executable).parent / "cascade-train")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(*args: str) -> None:
    subprocess.run([TRAIN, "--no-progress", *args], check=True, cwd=ROOT)


def base(dataset: str, work: Path) -> tuple[Path, Path, Path]:
    """(the MLP bundle, the teacher's repository, its run directory)."""
    if dataset == "fashion_mnist":
        serving = ROOT / "runs" / "serving"
        bundle, repo = build_cascade(serving)
        return bundle, repo, serving / "run"
    from cascade_server.train.demo import build_demo

    demo = build_demo(
        work / "demo" / "model_repository",
        work / "demo" / "bundles",
        progress=False,
        run_dir=work / "demo" / "run",
    )
    return demo.path, work / "demo" / "model_repository", work / "demo" / "run"


def student(work: Path, run: Path, cascade: str, name: str, **sections: dict) -> Path:
    """Another student of the same teacher (its checkpoint), exported as the same cascade:
    the teacher's run's config with `sections` replaced."""
    from cascade_server.train.config import ExperimentConfig, dump_config, load_config

    out = work / name
    bundle = out / "bundles" / cascade
    if (bundle / "manifest.json").is_file():
        return bundle
    raw = load_config(run / "config.yaml").model_dump(mode="json")
    raw["teacher"]["checkpoint"] = str(run / "teacher.pt")
    raw.update(name=f"{raw['name']}-{name}", **sections)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(ExperimentConfig.model_validate(raw)))
    sh(
        "run",
        str(out / "config.yaml"),
        "--export",
        "--run-dir",
        str(out / "run"),
        "--bundles",
        str(out / "bundles"),
        "--repository",
        str(out / "model_repository"),
    )
    return bundle


def test_images(dataset: str, run: Path) -> tuple[np.ndarray, np.ndarray]:
    if dataset == "fashion_mnist":
        images = read_idx(DATA / "t10k-images-idx3-ubyte.gz")[:, :, :, None]
        return images, read_idx(DATA / "t10k-labels-idx1-ubyte.gz").astype(int)
    from cascade_server.train.config import load_config
    from cascade_server.train.stages import prepare

    prep = prepare(load_config(run / "config.yaml", []))
    spec = prep.spec
    x = prep.x["test"].transpose(0, 2, 3, 1) * np.array(spec.std) + np.array(spec.mean)
    return np.rint(x * 255).clip(0, 255).astype(np.uint8), prep.y["test"]


def test_frontier(bundle: Bundle, repo: Path, images: np.ndarray, labels: np.ndarray) -> Frontier:
    """The cascade's frontier on the test split (its stages' ONNX graphs, the teacher's)."""
    from cascade_server.preprocess import normalize
    from cascade_server.train.stages.compose import bundle_logits, teacher_model
    from cascade_server.train.stages.frontier import frontier

    x = normalize(images, bundle.manifest.preprocess)
    stages = [bundle_logits(bundle, x)]
    for tier in bundle.manifest.tiers:
        stages.append(_run(bundle.tier_path(tier), x, tier.prev_input, stages[-1]))
    teacher = _run(teacher_model(repo, bundle), x, None, None)
    costs = [bundle.manifest.calibration.cost_student, *(t.cost for t in bundle.manifest.tiers)]
    return frontier(stages, teacher, labels, costs, split="test")


def _run(path: Path, x: np.ndarray, prev_input: str | None, prev: np.ndarray | None):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = []
    for i in range(0, len(x), 512):
        feeds = {name: x[i : i + 512]}
        if prev_input is not None and prev is not None:
            feeds[prev_input] = prev[i : i + 512].astype(np.float32)
        out.append(session.run(None, feeds)[0])
    return np.concatenate(out)


def cheapest_at(front: Frontier, accuracy: float) -> dict | None:
    """The least teacher share, and the least expected cost, on the frontier reaching
    `accuracy` (None: never reached)."""
    rows = [r for r in front.rows if r.cascade_accuracy >= accuracy]
    if not rows:
        return None
    return {
        "teacher_share": round(min(r.teacher_rate for r in rows), 4),
        "expected_cost": round(min(r.expected_cost for r in rows), 4),
    }


def serve(
    bundle: Path,
    triton_url: str,
    work: Path,
    bodies: list[bytes],
    labels: np.ndarray,
    policy: dict,
    names: tuple[str, ...],
) -> dict:
    with gateway(bundle, triton_url, work) as url:
        set_to = adaptive.admin(url, "PUT", "/admin/threshold", policy)
        asyncio.run(closed_loop(url, bodies[:500], 16))  # warm-up
        t0 = time.perf_counter()
        recs = asyncio.run(closed_loop(url, bodies, 16))
        seconds = time.perf_counter() - t0
    ok = [r for r in recs if r["status"] == 200]
    by = [r["by"] for r in ok]
    correct = np.array([r["label"] for r in ok]) == labels[[r["i"] for r in ok]]
    return {
        "policy": policy,
        "thresholds": [set_to["threshold_in_force"], *set_to["tier_thresholds_in_force"]],
        "requests_per_s": round(len(recs) / seconds, 1),
        "accuracy": round(float(correct.mean()), 4),
        "errors": len(recs) - len(ok),
        "teacher_calls": by.count("teacher"),
        "answered": {n: round(by.count(n) / len(ok), 4) for n in names},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", choices=["fashion_mnist", "digits"], default="fashion_mnist")
    p.add_argument("--images", type=int, default=10000, help="test images served live")
    p.add_argument("--offline-only", action="store_true")
    args = p.parse_args()
    work = ROOT / "runs" / f"stages-{args.dataset}"
    work.mkdir(parents=True, exist_ok=True)
    mlp, repo, run = base(args.dataset, work)
    log("students: LeNet (KD), B-DISTIL (3 MLP members)")
    lenet = student(
        work, run, mlp.name, "lenet", student={"arch": "lenet", "params": {"width": 16}}
    )
    members = {"members": 3, "beta": 0.5, "connect": False}
    bdistil = student(work, run, mlp.name, "bdistil", method={"name": "bdistil", "params": members})
    graph = work / "bdistil" / "graph" / bdistil.name
    if not (graph / "manifest.json").is_file():
        sh(
            "export",
            str(work / "bdistil" / "run"),
            "--bundles",
            str(graph.parent),
            "--repository",
            str(work / "bdistil" / "model_repository"),
            "--set",
            "export.anytime=graph",
        )
    three = work / "three" / mlp.name
    if not (three / "manifest.json").is_file():
        sh(
            "compose",
            str(mlp),
            "--tier",
            str(lenet),
            "--tier-name",
            "lenet",
            "--data",
            str(run),
            "--repository",
            str(repo),
            "--out",
            str(three),
            "--force",
        )
    images, labels = test_images(args.dataset, run)
    images, labels = images[: args.images], labels[: args.images]
    cascades = {
        "mlp->teacher": mlp,
        "lenet->teacher": lenet,
        "mlp->lenet->teacher": three,
        "bdistil stages": bdistil,
    }
    bundles = {k: Bundle.load(v) for k, v in cascades.items()}
    log("offline: frontiers on the test split")
    fronts = {k: test_frontier(b, repo, images, labels) for k, b in bundles.items()}
    teacher_acc = _teacher_accuracy(bundles["mlp->teacher"], repo, images, labels)
    # From 1 pt under the teacher to just above it (cascades can beat their teacher): where a
    # strong second stage (the LeNet) alone falls short, the teacher is needed by all of them.
    targets = [round(teacher_acc - d, 4) for d in (0.01, 0.005, 0.002, 0.0, -0.001)]
    offline = {f"{t:.4f}": {k: cheapest_at(f, t) for k, f in fronts.items()} for t in targets}
    results: dict = {
        "dataset": args.dataset,
        "teacher_accuracy": teacher_acc,
        "offline": offline,
        "frontiers": {k: [r.model_dump() for r in f.rows] for k, f in fronts.items()},
    }
    out = ROOT / "benchmarks" / "results" / f"stages-{args.dataset}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    for t, row in offline.items():
        log(
            f"at accuracy {t} (teacher share, cost): "
            + ", ".join(f"{k} {v}" for k, v in row.items())
        )
    if args.offline_only:
        return 0
    bodies = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img.squeeze(-1), "L").save(buf, "PNG")
        bodies.append(json.dumps({"image": base64.b64encode(buf.getvalue()).decode()}).encode())
    triton_repo = python_backend_repository(repo.resolve(), work / "triton" / "repository")
    live: dict = {}
    with TritonServer(triton_repo, work / "triton") as triton:
        for name, path in cascades.items():
            log(f"live: {name}")
            policy = {"target_accuracy": targets[2]}
            live[name] = serve(
                path, triton.grpc_url, work, bodies, labels, policy, bundles[name].stage_names
            )
            log(f"  {live[name]}")
        # One graph (every member for every item) at the teacher share the stages had: its
        # calibration table's threshold for that rate, fixed.
        share = live["bdistil stages"]["answered"]["teacher"]
        one = Bundle.load(graph)
        policy = {"threshold": one.manifest.calibration.threshold_for_rate(share)}
        log("live: bdistil one graph")
        live["bdistil one graph"] = serve(
            graph, triton.grpc_url, work, bodies, labels, policy, one.stage_names
        )
        log(f"  {live['bdistil one graph']}")
    results["live"] = {"target_accuracy": targets[2], **live}
    out.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {out}")
    return 0


def _teacher_accuracy(bundle: Bundle, repo: Path, images: np.ndarray, labels: np.ndarray) -> float:
    from cascade_server.preprocess import normalize
    from cascade_server.train.stages.compose import teacher_model

    logits = _run(
        teacher_model(repo, bundle), normalize(images, bundle.manifest.preprocess), None, None
    )
    return round(float((softmax(logits).argmax(1) == labels).mean()), 4)


if __name__ == "__main__":
    sys.exit(main())
