"""The flywheel, end to end on a real gateway and the bundled Triton: serve the test mix, shift to
the four top classes with capture on, distil a new student from the capture, publish it, and
compare delegation on the shifted mix before and after.

    python benchmarks/flywheel.py          # ~10 min on 2 cores (the serving cascade reused)

The cascade is the serving benchmark's (configs/fashion_mnist/serving.yaml: ResNet-20 teacher,
MLP-16 student). Fashion-MNIST's test images are split: the first 1,000 of the mix and the first
half of the tops (T-shirt, pullover, coat, shirt) are the traffic that is captured; the second
half of the tops is the shifted traffic both students are measured on (never captured).
1. The gateway with `CASCADE_CAPTURE__DIRECTORY` (and shadow samples, 20%, captured too) serves
   the mix, then the tops; delegation and accuracy on the held-out tops are measured live at the
   bundle's calibrated threshold.
2. `cascade-train distill <copy of the run> --capture DIR`, `export`, `publish --gateway URL`:
   the new student serves without a restart.
3. The held-out tops again, live, at the new bundle's calibrated threshold; and offline, on the
   same images, the delegation each student needs to reach the accuracy the old one had
   (the teacher's answers computed with its ONNX graph).
Writes benchmarks/results/flywheel.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.adaptive import (  # noqa: E402
    TOKEN,
    TOPS,
    bodies_of,
    closed_loop,
    gateway,
    teacher_predictions,
    test_set,
)
from benchmarks.serving import build_cascade  # noqa: E402
from cascade_server.bundle import Bundle  # noqa: E402
from cascade_server.policy import decide  # noqa: E402
from cascade_server.preprocess import normalize  # noqa: E402
from cascade_server.triton import TritonServer, python_backend_repository  # noqa: E402

TRAIN = str(Path(sys.executable).parent / "cascade-train")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def train(*args: str) -> str:
    env = {**os.environ, "CASCADE_ADMIN_TOKEN": TOKEN}
    done = subprocess.run(
        [TRAIN, "--no-progress", *args], check=True, cwd=ROOT, env=env, capture_output=True
    )
    return done.stdout.decode()


def live(url: str, bodies: list[bytes], labels: np.ndarray) -> dict:
    recs = [r for r in asyncio.run(closed_loop(url, bodies, 16)) if r["status"] == 200]
    correct = np.array([r["label"] for r in recs]) == labels[[r["i"] for r in recs]]
    return {
        "items": len(recs),
        "delegation": round(float(np.mean([r["delegated"] for r in recs])), 4),
        "accuracy": round(float(correct.mean()), 4),
        "threshold": recs[0]["threshold"],
    }


def curve(bundle: Bundle, images: np.ndarray, labels: np.ndarray, teacher: np.ndarray):
    """(delegation, accuracy) per threshold on these images: the cascade's trade offline."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(bundle.student_path), providers=["CPUExecutionProvider"])
    x = normalize(images[:, :, :, None], bundle.manifest.preprocess)
    (logits,) = session.run(None, {bundle.manifest.student_input: x})
    d = decide(logits, 0.0, **bundle.manifest.policy())
    order = np.argsort(d.margins)  # delegating the k least sure
    student_ok = (d.probs.argmax(1) == labels)[order]
    teacher_ok = (teacher == labels)[order]
    n = len(labels)
    # accuracy when the k least sure go to the teacher, k = 0..n
    acc = (
        np.concatenate([[0], np.cumsum(teacher_ok)])
        + student_ok.sum()
        - np.concatenate([[0], np.cumsum(student_ok)])
    ) / n
    return np.arange(n + 1) / n, acc


def delegation_for(rates: np.ndarray, acc: np.ndarray, target: float) -> float:
    reached = np.flatnonzero(acc >= target)
    return float(rates[reached[0]]) if reached.size else 1.0


def main() -> int:
    work = ROOT / "runs" / "flywheel"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    serving = ROOT / "runs" / "serving"
    bundle_dir, repo = build_cascade(serving)
    old = Bundle.load(bundle_dir)
    encoded, labels, images = test_set()
    rng = np.random.default_rng(0)
    tops = np.flatnonzero(np.isin(labels, TOPS))
    rng.shuffle(tops)
    captured_tops, held_out = tops[: len(tops) // 2], tops[len(tops) // 2 :]
    mix = np.setdiff1d(np.arange(len(labels)), tops)[:1000]
    teacher = teacher_predictions(old, repo, images[held_out])
    capture = work / "capture"
    env = {
        "CASCADE_CAPTURE__DIRECTORY": str(capture),
        "CASCADE_CAPTURE__FLUSH_S": "0.5",
        "CASCADE_SHADOW__FRACTION": "0.2",
    }
    results: dict = {"held_out_tops": len(held_out), "old_version": old.manifest.version}
    triton_repo = python_backend_repository(repo.resolve(), work / "triton" / "repository")
    with TritonServer(triton_repo, work / "triton") as triton:
        with gateway(bundle_dir, triton.grpc_url, work, **env) as url:
            log("the mix, then the tops (captured)")
            results["mix"] = live(url, bodies_of(encoded, mix), labels[mix])
            results["captured_tops"] = live(
                url, bodies_of(encoded, captured_tops), labels[captured_tops]
            )
            log("held-out tops on the old student")
            results["before"] = live(url, bodies_of(encoded, held_out), labels[held_out])
            log(f"  {results['before']}")
            time.sleep(2)  # the capture's last shard (flush_s) and the shadow calls
            run = work / "run"
            shutil.copytree(serving / "run", run)
            log("distil from the capture")
            out = train("distill", str(run), "--capture", str(capture), "--capture-repeat", "4")
            results["distill"] = json.loads(out.strip().splitlines()[-1])
            train(
                "export",
                str(run),
                "--bundles",
                str(work / "v2"),
                "--repository",
                str(work / "v2-repository"),
            )
            new_dir = work / "v2" / old.manifest.name
            log("publish")
            results["publish"] = json.loads(train("publish", str(new_dir), "--gateway", url))
            log("held-out tops on the new student")
            results["after"] = live(url, bodies_of(encoded, held_out), labels[held_out])
            log(f"  {results['after']}")
    new = Bundle.load(new_dir)
    before = curve(old, images[held_out], labels[held_out], teacher)
    after = curve(new, images[held_out], labels[held_out], teacher)
    target = results["before"]["accuracy"]
    results["offline_same_accuracy"] = {
        "accuracy": target,
        "delegation_before": round(delegation_for(*before, target), 4),
        "delegation_after": round(delegation_for(*after, target), 4),
    }
    log(f"at accuracy {target}: {results['offline_same_accuracy']}")
    out_path = ROOT / "benchmarks" / "results" / "flywheel.json"
    out_path.write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
