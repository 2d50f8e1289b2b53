"""Compare every distillation method on the same data, teacher and student architecture.

Trains one teacher on Fashion-MNIST (images) or Banking77 (text intents) from ../shared/data,
then a student with each method, and writes per method: student accuracy, cascade accuracy at
10/20/30% delegation, the delegation needed to reach teacher accuracy - 0.5 point, AUC, gap
recovered; as JSON, a markdown table and one plot. Default settings take well under an hour on
2 CPU cores each; --quick takes minutes.

    python benchmarks/methods.py --dataset fashion_mnist   # table in benchmarks/README.md
    python benchmarks/methods.py --dataset banking77
    python benchmarks/methods.py --quick                   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

from cascade_server.train.config import ExperimentConfig
from cascade_server.train.methods import METHODS
from cascade_server.train.records import RunDir
from cascade_server.train.stages import (
    Pair,
    calibrate,
    distill,
    evaluate,
    plot,
    prepare,
    start_run,
    train_teacher,
)

ROOT = Path(__file__).resolve().parents[1]
TEACHER_FILES = (
    RunDir.TEACHER_WEIGHTS,
    RunDir.TEACHER_META,
    RunDir.TEACHER_LOGITS,
    RunDir.RECORD,
    "tokenizer.json",  # TextPreprocess.tokenizer_file
    RunDir.TOKENIZER_KEY,
)


def config(args, method: str) -> ExperimentConfig:
    if args.dataset == "banking77":
        return banking77_config(args, method)
    return fashion_config(args, method)


def _method_params(args, method: str, default_k: int) -> dict:
    if method == "bdistil":
        return {"members": 3}
    if method.startswith("cd"):
        return {"top_k_classes": args.in_domain_k or default_k}
    return {}


def banking77_config(args, method: str) -> ExperimentConfig:
    root = args.data or ROOT.parent / "shared" / "data" / "banking77"
    epochs = 8 if args.quick else args.student_epochs
    return ExperimentConfig.model_validate(
        {
            "name": f"banking77-{method}",
            "seed": args.seed,
            "device": args.device,
            "data": {
                "name": "csv",
                "params": {
                    "path": str(root / "train.csv"),
                    "classes": str(root / "categories.json"),
                },
                "test_params": {"path": str(root / "test.csv")},
            },
            "split": {"val": 0.1, "test": 0.05},
            "text": {"vocab_size": 8000, "max_length": 32},
            "teacher": {
                "arch": "transformer",
                "params": {"dim": 128, "heads": 4, "layers": 2, "ff": 256},
                "epochs": 4 if args.quick else 20,
                "lr": 1e-3,
                "batch_size": 64,
            },
            "student": {"arch": "bag", "params": {"dim": 16, "buckets": 0}},
            # CD: L_in = the 23 most frequent of 77 intents (30%, as 30 of CIFAR-100's 100).
            "method": {"name": method, "params": _method_params(args, method, 23)},
            "fit": {
                "epochs": max(2, epochs // 2) if method == "disk" else epochs,
                "lr": 1e-2,
                "batch_size": 64,
            },
            "export": {"name": "banking77"},
        }
    )


def fashion_config(args, method: str) -> ExperimentConfig:
    data_params = {
        "path": str(args.data or ROOT.parent / "shared" / "data" / "fashion_mnist"),
        "split": "train",
    }
    if args.quick:
        data_params["limit"] = 12000
    # Methods that cost several KD runs get fewer epochs so that the whole run fits the budget
    # (each DiSK epoch is 3 student + 3 guide passes; B-DISTIL trains `members` students).
    epochs = args.student_epochs
    if method == "disk":
        epochs = max(2, epochs // 2)
    method_params = _method_params(args, method, 5)
    return ExperimentConfig.model_validate(
        {
            "name": f"fashion-{method}",
            "seed": args.seed,
            "device": args.device,
            "data": {
                "name": "idx",
                "params": data_params,
                "test_params": {"split": "test", "limit": None},
            },
            "split": {"val": 0.1, "test": 0.05},
            "teacher": teacher_section(args),
            "student": {"arch": "mlp", "params": {"hidden": [args.student_hidden]}},
            "method": {"name": method, "params": method_params},
            "fit": {"epochs": epochs, "lr": 3e-3, "batch_size": 128},
            "export": {"name": "fashion"},
        }
    )


# The published CIFAR ResNet recipe (docs/training.md): what a ResNet teacher needs to reach
# the accuracies papers report; the LeNet default keeps AdamW + one-cycle.
PUBLISHED_RECIPE = {
    "optimizer": "sgd",
    "momentum": 0.9,
    "lr": 0.1,
    "weight_decay": 5e-4,
    "schedule": "cosine",
    "warmup_epochs": 5,
    "crop_padding": 4,
    "hflip": True,
}


def teacher_section(args) -> dict:
    section = {
        "arch": args.teacher_arch,
        "params": {"width": args.teacher_width},
        "epochs": args.teacher_epochs,
        "lr": 3e-3,
        "batch_size": 128,
    }
    if args.published_recipe:
        section.update(PUBLISHED_RECIPE)
        section["warmup_epochs"] = min(5, max(1, args.teacher_epochs // 20))
    return section


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", choices=["fashion_mnist", "banking77"], default="fashion_mnist")
    p.add_argument("--data", type=Path, help="dataset folder (default: ../shared/data/<dataset>)")
    p.add_argument("--out", type=Path, help="default: benchmarks/results/<dataset>")
    p.add_argument("--runs", type=Path, help="default: runs/bench-<dataset>")
    p.add_argument("--methods", nargs="+", default=METHODS.names(), choices=METHODS.names())
    p.add_argument("--quick", action="store_true", help="12k training images, few epochs")
    p.add_argument(
        "--table-only",
        action="store_true",
        help="rebuild the table and plot from the run directories of --methods",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where teachers and students train"
    )
    p.add_argument("--teacher-arch", default="lenet", help="e.g. resnet56 (Fashion-MNIST)")
    p.add_argument(
        "--published-recipe",
        action="store_true",
        help="teacher: SGD + cosine + warm-up, crops and flips (docs/training.md)",
    )
    p.add_argument("--teacher-width", type=int, default=32)
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--student-hidden", type=int, default=16)
    p.add_argument("--student-epochs", type=int, default=12)
    p.add_argument(
        "--in-domain-k",
        type=int,
        help="CD methods: |L_in| (default: 5 of 10 classes, 23 of 77 intents)",
    )
    args = p.parse_args()
    args.out = args.out or ROOT / "benchmarks" / "results" / args.dataset
    args.runs = args.runs or ROOT / "runs" / f"bench-{args.dataset}"
    if args.dataset == "banking77" and args.student_epochs == 12:
        args.student_epochs = 30
    if args.quick:
        args.teacher_epochs, args.student_epochs = (
            min(args.teacher_epochs, 3),
            min(args.student_epochs, 4),
        )
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    if args.table_only:
        return write_results(args, *collect(args))
    started = time.perf_counter()
    teacher_dir = args.runs / "teacher"
    prep = prepare(config(args, "kd"), teacher_dir)
    start_run(teacher_dir, prep.config, prep)
    teacher = train_teacher(prep, teacher_dir, progress=False)
    teacher_seconds = time.perf_counter() - started

    curves, rows = {}, []
    for method in args.methods:
        run = args.runs / method
        run.mkdir(parents=True, exist_ok=True)
        for name in TEACHER_FILES:  # the same teacher (and tokenizer) for every method
            if (teacher_dir / name).is_file():
                shutil.copyfile(teacher_dir / name, run / name)
        prep = prepare(config(args, method), run)
        start_run(run, prep.config, prep)
        t0 = time.perf_counter()
        needs_teacher = METHODS.get(method).needs_teacher
        student = distill(prep, run, teacher if needs_teacher else None, progress=False)
        seconds = time.perf_counter() - t0
        pair = Pair(student, teacher)  # in memory: nothing reloaded from the run directory
        calibrate(prep, run, pair=pair)
        ev = evaluate(prep, run, pair=pair)
        curves[method] = ev
        s = ev["summary"]
        rows.append({"method": method, "seconds": round(seconds, 1), **s})
        logging.info(
            "%s: student %.4f, cascade@20%% %s (%.0fs)",
            method,
            s["student_accuracy"],
            s["cascade_accuracy"]["0.2"],
            seconds,
        )

    meta = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "teacher_seconds": round(teacher_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "n_test": len(prep.y["test"]),
        "n_train": len(prep.y["train"]),
    }
    write_results(args, curves, rows, meta)


def collect(args) -> tuple[dict, list[dict], dict]:
    """Curves, rows and meta from finished run directories (after an interrupted run)."""
    curves, rows = {}, []
    for method in args.methods:
        run = args.runs / method
        if not (run / RunDir.EVALUATION).is_file():
            continue
        ev = json.loads((run / RunDir.EVALUATION).read_text())
        record = RunDir(run).record()
        curves[method] = ev
        seconds = record.student.seconds if record.student else None
        rows.append({"method": method, "seconds": seconds, **ev["summary"]})
    teacher = RunDir(args.runs / "teacher").record().teacher
    meta = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "teacher_seconds": teacher.seconds if teacher else None,
        "total_seconds": "n/a (collected)",
        "n_test": "see runs",
        "n_train": "see runs",
    }
    return curves, rows, meta


def write_results(args, curves: dict, rows: list[dict], meta: dict) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plot(curves, args.out / "curves.png", title=f"{args.dataset}: cascade accuracy vs delegation")
    (args.out / "table.md").write_text(table(rows, meta))
    print(table(rows, meta))


def fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def table(rows: list[dict], meta: dict) -> str:
    lines = [
        "| method | student acc | cascade @10% | @20% | @30% | delegation to teacher-0.5pt "
        "| AUC | gap recovered @20% | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["cascade_accuracy"]
        lines.append(
            f"| {r['method']} | {fmt(r['student_accuracy'])} | {fmt(c['0.1'])} | {fmt(c['0.2'])} | "
            f"{fmt(c['0.3'])} | {fmt(r['delegation_to_teacher_minus_0.5pt'])} | {fmt(r['auc'])} | "
            f"{fmt(r['gap_recovered']['0.2'])} | {r['seconds']} |"
        )
    teacher = rows[0]["teacher_accuracy"] if rows else float("nan")
    lines.append("")
    lines.append(
        f"Teacher accuracy {teacher:.4f} on {meta['n_test']} test images; "
        f"{meta['n_train']} training images; teacher trained in {meta['teacher_seconds']} s, "
        f"whole run {meta['total_seconds']} s."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
