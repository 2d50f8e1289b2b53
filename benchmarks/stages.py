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
import urllib.error
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


def test_frontier(
    bundle: Bundle, repo: Path, images: np.ndarray, labels: np.ndarray, calls_only: bool = False
) -> Frontier:
    """The cascade's frontier on the test split (its stages' ONNX graphs, the teacher's).
    `calls_only`: every stage but the teacher free, so the frontier is accuracy against the
    teacher's share alone (the least teacher calls at each accuracy, whatever the compute)."""
    from cascade_server.preprocess import normalize
    from cascade_server.train.stages.compose import bundle_logits, teacher_model
    from cascade_server.train.stages.frontier import frontier

    x = normalize(images, bundle.manifest.preprocess)
    stages = [bundle_logits(bundle, x)]
    for tier in bundle.manifest.tiers:
        stages.append(_run(bundle.tier_path(tier), x, tier.prev_input, stages[-1]))
    teacher = _run(teacher_model(repo, bundle), x, None, None)
    costs = [bundle.manifest.calibration.cost_student, *(t.cost for t in bundle.manifest.tiers)]
    if calls_only:
        costs = [0.0] * len(costs)
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


def anytime_seconds(
    stages: Bundle, graph: Bundle, images: np.ndarray, thresholds: list[float], reps: int = 7
) -> dict:
    """B-DISTIL's members on ONNX Runtime, per 64-row micro-batch (the gateway's calls, one
    thread): as stages (member k+1 on what 1..k left unsure, at `thresholds`) vs one graph
    (every member for every row). Medians of `reps` passes over `images`, microseconds."""
    import onnxruntime as ort

    from cascade_server.policy import top2_margin
    from cascade_server.preprocess import normalize

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1

    def session(path: Path):
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    x = normalize(images, stages.manifest.preprocess)
    batches = [x[i : i + 64] for i in range(0, len(x), 64)]
    first = session(stages.student_path)
    tiers = [(session(stages.tier_path(t)), t) for t in stages.manifest.tiers]
    whole = session(graph.student_path)
    name = first.get_inputs()[0].name

    def staged(b: np.ndarray) -> None:
        logits = first.run(None, {name: b})[0]
        unsure = top2_margin(softmax(logits)) < thresholds[0]
        rows, prev = np.flatnonzero(unsure), logits[unsure]
        for (sess, tier), threshold in zip(tiers, thresholds[1:], strict=True):
            if not rows.size:
                return
            logits = sess.run(None, {tier.input_name: b[rows], tier.prev_input: prev})[0]
            unsure = top2_margin(softmax(logits)) < threshold
            rows, prev = rows[unsure], logits[unsure]

    def passes(fn) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for b in batches:
                fn(b)
            times.append((time.perf_counter() - t0) / len(batches))
        return float(np.median(times)) * 1e6

    graph_us = passes(lambda b: whole.run(None, {whole.get_inputs()[0].name: b}))
    staged_us = passes(staged)
    return {
        "us_per_batch_of_64": {"stages": round(staged_us, 1), "one graph": round(graph_us, 1)},
        "stages_over_graph": round(staged_us / graph_us, 3),
    }


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
    p.add_argument("--reps", type=int, default=3, help="B-DISTIL stages vs graph, alternated")
    p.add_argument("--budget", type=float, default=0.1, help="the cost budget held (teacher=1)")
    p.add_argument("--shift-items", type=int, default=4000, help="requests per shift phase")
    p.add_argument(
        "--cost-hold",
        action="store_true",
        help="only the cost budget held under a traffic shift (the three-stage cascade): "
        "writes benchmarks/results/stages-<dataset>-cost-hold.json",
    )
    p.add_argument(
        "--accuracy-hold",
        action="store_true",
        help="only a target accuracy held under a traffic shift (the three-stage cascade, "
        "shadow samples on): writes benchmarks/results/stages-<dataset>-accuracy-hold.json",
    )
    p.add_argument(
        "--target",
        type=float,
        default=None,
        help="--accuracy-hold's target accuracy (default: halfway between the LeNet alone and "
        "the best of the three-stage cascade, on its validation frontier)",
    )
    p.add_argument("--shadow", type=float, default=0.2, help="--accuracy-hold's shadow share")
    p.add_argument("--out", type=Path, default=None, help="the holds' JSON (default: by mode)")
    p.add_argument(
        "--mid-width",
        type=int,
        default=16,
        help="the LeNet's width (16: the mid model of the issue; smaller: a weaker, cheaper mid "
        "model, offline only, B-DISTIL left out; writes stages-<dataset>-mid<width>.json)",
    )
    args = p.parse_args()
    work = ROOT / "runs" / f"stages-{args.dataset}"
    work.mkdir(parents=True, exist_ok=True)
    mlp, repo, run = base(args.dataset, work)
    log("students: LeNet (KD), B-DISTIL (3 MLP members)")
    mid = "lenet" if args.mid_width == 16 else f"lenet{args.mid_width}"
    lenet = student(
        work, run, mlp.name, mid, student={"arch": "lenet", "params": {"width": args.mid_width}}
    )
    holding = args.cost_hold or args.accuracy_hold
    if args.mid_width != 16:
        holding, args.offline_only = False, True
    members = {"members": 3, "beta": 0.5, "connect": False}
    if not (holding or args.mid_width != 16):  # the holds serve the three-stage cascade alone
        bdistil = student(
            work, run, mlp.name, "bdistil", method={"name": "bdistil", "params": members}
        )
    graph = work / "bdistil" / "graph" / mlp.name
    if not (holding or args.mid_width != 16) and not (graph / "manifest.json").is_file():
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
    three = work / ("three" if args.mid_width == 16 else f"three-{mid}") / mlp.name
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
    if holding:
        three_bundle = Bundle.load(three)
        if args.cost_hold:
            name, policy, env = "cost-hold", {"cost_budget": args.budget}, {}
        else:
            target = args.target if args.target is not None else needs_teacher(three_bundle)
            name, policy = "accuracy-hold", {"target_accuracy": target}
            env = {
                "CASCADE_SHADOW__FRACTION": str(args.shadow),
                # Half a phase: the evidence of the phase before ages out within it.
                "CASCADE_CONTROLLER__EVIDENCE_ITEMS": str(max(args.shift_items // 2, 1000)),
            }
        bodies = encode(images)
        teacher = _teacher_classes(three_bundle, repo, images)
        repository = python_backend_repository(repo.resolve(), work / "triton" / "repository")
        with TritonServer(repository, work / "triton") as triton:
            held = hold(
                three,
                three_bundle,
                triton.grpc_url,
                work,
                bodies,
                labels,
                teacher,
                policy,
                args.shift_items,
                env,
            )
        path = args.out or ROOT / "benchmarks" / "results" / f"stages-{args.dataset}-{name}.json"
        path.write_text(json.dumps(held, indent=2) + "\n")
        log(f"wrote {path}")
        return 0
    cascades = {
        "mlp->teacher": mlp,
        "lenet->teacher": lenet,
        "mlp->lenet->teacher": three,
    }
    if args.mid_width == 16:
        cascades["bdistil stages"] = bdistil
    bundles = {k: Bundle.load(v) for k, v in cascades.items()}
    log("offline: frontiers on the test split")
    fronts = {k: test_frontier(b, repo, images, labels) for k, b in bundles.items()}
    teacher_acc = _teacher_accuracy(bundles["mlp->teacher"], repo, images, labels)
    # From 1 pt under the teacher to just above it (cascades can beat their teacher): where a
    # strong second stage (the LeNet) alone falls short, the teacher is needed by all of them.
    targets = [round(teacher_acc - d, 4) for d in (0.01, 0.005, 0.002, 0.0, -0.001)]
    offline = {f"{t:.4f}": {k: cheapest_at(f, t) for k, f in fronts.items()} for t in targets}
    # The least teacher share at each accuracy over every setting (not only the cost frontier's).
    calls = {k: test_frontier(b, repo, images, labels, calls_only=True) for k, b in bundles.items()}
    fewest = {
        f"{t:.4f}": {k: (cheapest_at(f, t) or {}).get("teacher_share") for k, f in calls.items()}
        for t in targets
    }
    results: dict = {
        "dataset": args.dataset,
        "teacher_accuracy": teacher_acc,
        "offline": offline,
        "fewest_teacher_calls": fewest,
        "frontiers": {k: [r.model_dump() for r in f.rows] for k, f in fronts.items()},
    }
    suffix = "" if args.mid_width == 16 else f"-mid{args.mid_width}"
    out = ROOT / "benchmarks" / "results" / f"stages-{args.dataset}{suffix}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    for t, row in offline.items():
        log(
            f"at accuracy {t} (teacher share, cost): "
            + ", ".join(f"{k} {v}" for k, v in row.items())
        )
        log(f"  fewest teacher calls: {fewest[t]}")
    if args.offline_only:
        return 0
    bodies = encode(images)
    # The three-stage cascade once more with its LeNet on Triton (`runtime: triton`).
    live_repo, remote = lenet_on_triton(bundles["mlp->lenet->teacher"], repo, work)
    served = dict(cascades)
    served["mlp->lenet(triton)->teacher"] = remote
    bundles["mlp->lenet(triton)->teacher"] = Bundle.load(remote)
    triton_repo = python_backend_repository(live_repo.resolve(), work / "triton" / "repository")
    live: dict = {}
    with TritonServer(triton_repo, work / "triton") as triton:
        # Two targets: teacher - 0.2 pt (on this teacher a strong second stage alone may reach
        # it), and halfway between the LeNet alone and the best LeNet -> teacher cascade on the
        # validation split (the frontier the admin API resolves on): every cascade needs the
        # teacher there.
        for target in (targets[2], needs_teacher(bundles["lenet->teacher"])):
            rows = live.setdefault(f"{target:.4f}", {})
            for name, path in served.items():
                log(f"live: {name} at target_accuracy {target}")
                policy = {"target_accuracy": target}
                try:
                    rows[name] = serve(
                        path,
                        triton.grpc_url,
                        work,
                        bodies,
                        labels,
                        policy,
                        bundles[name].stage_names,
                    )
                except urllib.error.HTTPError as exc:  # out of reach on the validation split
                    rows[name] = {"refused": json.loads(exc.read())["error"]["message"]}
                log(f"  {rows[name]}")
        # B-DISTIL as stages vs as one graph (every member for every item) at the teacher share
        # the stages had (the graph's calibration threshold for that rate), alternated
        # `--reps` times: throughput medians.
        stages_row = live[f"{targets[2]:.4f}"]["bdistil stages"]
        one = Bundle.load(graph)
        share = stages_row["answered"]["teacher"]
        policies = {
            "bdistil stages": (bdistil, stages_row["policy"], bundles["bdistil stages"]),
            "bdistil one graph": (
                graph,
                {"threshold": one.manifest.calibration.threshold_for_rate(share)},
                one,
            ),
        }
        reps: dict[str, list[dict]] = {k: [] for k in policies}
        for _ in range(args.reps):
            for name, (path, policy, b) in policies.items():
                reps[name].append(
                    serve(path, triton.grpc_url, work, bodies, labels, policy, b.stage_names)
                )
                log(f"  {name}: {reps[name][-1]}")
        anytime = {
            name: {
                **rows_[-1],
                "requests_per_s": float(np.median([r["requests_per_s"] for r in rows_])),
                "requests_per_s_reps": [r["requests_per_s"] for r in rows_],
            }
            for name, rows_ in reps.items()
        }
        anytime["stages_over_graph"] = round(
            anytime["bdistil stages"]["requests_per_s"]
            / anytime["bdistil one graph"]["requests_per_s"],
            3,
        )
        log(f"anytime: {anytime}")
    share_thresholds = stages_row["thresholds"]
    anytime["onnx_runtime"] = anytime_seconds(
        bundles["bdistil stages"], one, images, share_thresholds
    )
    log(f"anytime on ONNX Runtime: {anytime['onnx_runtime']}")
    results["live"] = live
    results["anytime"] = anytime
    out.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {out}")
    return 0


TOPS = (0, 2, 4, 6)  # T-shirt/top, Pullover, Coat, Shirt: the hard classes (adaptive.py)


def hold(
    path: Path,
    bundle: Bundle,
    triton_url: str,
    work: Path,
    bodies: list[bytes],
    labels: np.ndarray,
    teacher: np.ndarray,
    policy: dict,
    n: int,
    held_env: dict[str, str],
) -> dict:
    """The three-stage cascade under `policy` (a cost budget or a target accuracy), the
    traffic shifting to the hard classes and back: per phase, the cost per item realised (from
    who answered), the teacher's share, the accuracy against the labels and the agreement with
    the teacher's own answers (`teacher`: its class per test image), with the controller
    holding the policy (`held_env`) and with it off (the calibrated row throughout)."""
    m = bundle.manifest
    costs = np.cumsum([m.calibration.cost_student, *(t.cost for t in m.tiers), 1.0])
    names = bundle.stage_names
    rng = np.random.default_rng(0)
    tops = np.flatnonzero(np.isin(labels, TOPS))
    phases = [
        ("test mix", rng.choice(len(labels), n)),
        ("only tops", rng.choice(tops, n)),
        ("test mix again", rng.choice(len(labels), n)),
    ]
    out: dict = {"policy": policy, "modes": {}}
    for mode, env in {
        "held": {"CASCADE_CONTROLLER__INTERVAL_S": "0.25", **held_env},
        "off": {"CASCADE_CONTROLLER__ENABLED": "false"},
    }.items():
        rows = []
        with gateway(path, triton_url, work, **env) as url:
            set_to = adaptive.admin(url, "PUT", "/admin/threshold", policy)
            for phase, idx in phases:
                recs = asyncio.run(closed_loop(url, [bodies[i] for i in idx], 8))
                ok = [r for r in recs if r["status"] == 200]
                stage = np.array([names.index(r["by"]) for r in ok])
                served = idx[[r["i"] for r in ok]]
                said = np.array([r["label"] for r in ok])
                correct = said == labels[served]
                agrees = said == teacher[served]
                state = adaptive.admin(url, "GET", "/admin/threshold")
                half = len(stage) // 2  # the phase's second half: after a move
                controller = state.get("controller") or {}
                rows.append(
                    {
                        "phase": phase,
                        "cost_per_item": round(float(costs[stage].mean()), 4),
                        "cost_second_half": round(float(costs[stage[half:]].mean()), 4),
                        "teacher_share": round(float((stage == len(names) - 1).mean()), 4),
                        "accuracy": round(float(correct.mean()), 4),
                        "agreement": round(float(agrees.mean()), 4),
                        "agreement_second_half": round(float(agrees[half:].mean()), 4),
                        "live_agreement": controller.get("live_agreement"),
                        "target_agreement": controller.get("target_agreement"),
                        "controller": controller.get("reason"),
                        "thresholds_at_end": [
                            round(state["threshold_in_force"], 4),
                            *(round(t, 4) for t in state["tier_thresholds_in_force"]),
                        ],
                    }
                )
                log(f"  {policy} ({mode}), {phase}: {rows[-1]}")
        out["modes"][mode] = {"start": set_to["tier_thresholds"], "phases": rows}
    return out


def encode(images: np.ndarray) -> list[bytes]:
    """Each image as the JSON body of one request (a base64 PNG)."""
    bodies = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img.squeeze(-1), "L").save(buf, "PNG")
        bodies.append(json.dumps({"image": base64.b64encode(buf.getvalue()).decode()}).encode())
    return bodies


def needs_teacher(bundle: Bundle) -> float:
    """Halfway between the student alone and the best cascade, on its validation frontier."""
    rows = (bundle.manifest.frontier or bundle.manifest.calibration.frontier()).rows
    alone = max(r.cascade_accuracy for r in rows if r.teacher_rate == 0.0)
    return round((alone + max(r.cascade_accuracy for r in rows)) / 2, 4)


def lenet_on_triton(three: Bundle, repo: Path, work: Path) -> tuple[Path, Path]:
    """(a repository with the teacher and the LeNet tier as a Triton model, the three-stage
    bundle whose LeNet tier is that model)."""
    import shutil

    from cascade_server.triton import read_model_config, write_model_config

    (tier,) = three.manifest.tiers
    out = work / "triton-tiers" / "model_repository"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(repo, out)
    model = f"{three.manifest.name}_lenet"
    config = read_model_config(repo / three.manifest.teacher.model_name / "config.pbtxt")
    config.name = model
    (out / model / "1").mkdir(parents=True)
    write_model_config(config, out / model / "config.pbtxt")
    shutil.copyfile(three.tier_path(tier), out / model / "1" / "model.onnx")
    bundle = work / "triton-tiers" / three.manifest.name
    if bundle.exists():
        shutil.rmtree(bundle)
    shutil.copytree(three.path, bundle)
    (bundle / tier.file).unlink()  # type: ignore[operator]
    ref = three.manifest.teacher.model_copy(
        update={"model_name": model, "input_name": tier.input_name, "output_name": tier.output}
    )
    remote = tier.model_copy(update={"runtime": "triton", "file": None, "model": ref})
    manifest = three.manifest.model_copy(update={"tiers": (remote,)})
    Bundle(bundle, type(manifest).model_validate(manifest.model_dump())).save()
    return out, bundle


def _teacher_classes(bundle: Bundle, repo: Path, images: np.ndarray) -> np.ndarray:
    from cascade_server.preprocess import normalize
    from cascade_server.train.stages.compose import teacher_model

    logits = _run(
        teacher_model(repo, bundle), normalize(images, bundle.manifest.preprocess), None, None
    )
    classes: np.ndarray = softmax(logits).argmax(1)
    return classes


def _teacher_accuracy(bundle: Bundle, repo: Path, images: np.ndarray, labels: np.ndarray) -> float:
    return round(float((_teacher_classes(bundle, repo, images) == labels).mean()), 4)


if __name__ == "__main__":
    sys.exit(main())
