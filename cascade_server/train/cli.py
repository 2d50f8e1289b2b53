"""cascade-train: teachers, distilled students, calibration, evaluation and export.

One experiment = one YAML file (configs/...). Each command reads and writes a run directory
(default runs/<experiment name>), so the stages can be run one by one or all at once with `run`.
Under `torchrun` training uses DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from .config import dump_config
from .methods import METHODS


def _experiment_args(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    p.add_argument("config", type=Path, help="experiment YAML (configs/...)")
    p.add_argument("--run-dir", type=Path, help="run directory (default: runs/<name>)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set fit.epochs=5 (repeatable)",
    )
    p.add_argument("--device", choices=["cpu", "cuda"], help="override the config's device")


def _run_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", type=Path, help="a run directory made by `teacher` or `run`")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bundles",
        type=Path,
        default=Path("bundles"),
        help="where the cascade bundle goes (default: %(default)s)",
    )
    p.add_argument(
        "--repository",
        type=Path,
        default=Path("model_repository"),
        help="Triton model repository for the teacher (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cascade-train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "run",
        help="every stage of one experiment: teacher, distill, calibrate, "
        "evaluate (and export with --export)",
    )
    _experiment_args(p)
    p.add_argument("--export", action="store_true", help="also export bundle + Triton entry")
    _export_args(p)

    p = sub.add_parser("teacher", help="train the teacher, or import a checkpoint / ONNX file")
    _experiment_args(p)
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="import a state-dict checkpoint of the config's teacher architecture",
    )
    p.add_argument("--onnx", type=Path, help="import an ONNX classifier as the teacher")

    p = sub.add_parser(
        "distill",
        help="train a student from the run's teacher",
        epilog="methods and their parameters:\n" + _methods_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _run_arg(p)
    p.add_argument("--method", choices=METHODS.names(), help="override the config's method")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method parameter (YAML value), e.g. --param temperature=2",
    )
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")

    p = sub.add_parser("calibrate", help="threshold table on the held-out split")
    _run_arg(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--target-rate", type=float, help="target delegation rate (0..1)")
    group.add_argument("--target-accuracy", type=float, help="target cascade accuracy (0..1)")

    p = sub.add_parser("evaluate", help="accuracy-vs-delegation curves (JSON + PNG), summaries")
    p.add_argument("runs", type=Path, nargs="+", help="run directories to compare on one plot")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("evaluation"),
        help="directory for curves.json and curves.png (default: %(default)s)",
    )

    p = sub.add_parser("export", help="cascade bundle + the teacher's Triton model entry")
    _run_arg(p)
    _export_args(p)

    sub.add_parser("methods", help="list the distillation methods and their parameters")

    p = sub.add_parser(
        "demo", help="train, calibrate and export the demo cascades (digits images, intents texts)"
    )
    _export_args(p)
    p.add_argument("--force", action="store_true", help="rebuild even if it exists")
    return parser


def _methods_text() -> str:
    from .methods import describe_methods

    return describe_methods()


def _load(args) -> tuple:
    from .config import load_config

    config = load_config(args.config, args.set)
    if args.device:
        config = config.model_copy(update={"device": args.device})
    return config, args.run_dir or Path("runs") / config.name


def _from_run(run: Path, overrides: list[str] = ()):
    from .config import load_config

    if not (run / "config.yaml").is_file():
        raise SystemExit(f"{run} is not a run directory (no config.yaml)")
    return load_config(run / "config.yaml", overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .engine import shutdown_distributed

    try:
        return _command(args)
    finally:
        shutdown_distributed()  # under torchrun: leave the process group cleanly


def _command(args: argparse.Namespace) -> int:
    # The ONNX exporter narrates every optimisation pass.
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    progress = not args.no_progress

    if args.command == "methods":
        print(_methods_text())
        return 0
    if args.command == "demo":
        from .demo import build_demos

        for bundle in build_demos(
            args.repository, args.bundles, progress=progress, force=args.force
        ):
            print(f"bundle: {bundle.path}  threshold: {bundle.manifest.default_threshold:.4f}")
        return 0

    from . import pipeline
    from .engine import distributed, init_distributed

    if args.command in ("run", "teacher"):
        config, run_dir = _load(args)
        if args.command == "teacher" and (args.checkpoint or args.onnx):
            config = config.model_copy(
                update={
                    "teacher": config.teacher.model_copy(
                        update={"checkpoint": args.checkpoint, "onnx": args.onnx}
                    )
                }
            )
        init_distributed(config.device)
        if args.command == "run":
            ev = pipeline.run_all(
                config,
                run_dir,
                progress=progress,
                bundles=args.bundles if args.export else None,
                repository=args.repository if args.export else None,
            )
            if distributed()[0] == 0:
                print(json.dumps(ev["summary"], indent=2))
            return 0
        prep = pipeline.prepare(config, run_dir)
        if distributed()[0] == 0:
            pipeline.start_run(run_dir, config, prep)
        pipeline.train_teacher(prep, run_dir, progress=progress)
        return 0

    if args.command == "distill":
        overrides = list(args.set)
        if args.method:
            overrides.append(f"method.name={args.method}")
            overrides.append("method.params={}")
        overrides += [f"method.params.{p}" for p in args.param]
        config = _from_run(args.run, overrides)
        init_distributed(config.device)
        prep = pipeline.prepare(config, args.run)
        if distributed()[0] == 0:
            (args.run / "config.yaml").write_text(dump_config(config))
        from .teachers import load_teacher

        teacher = (
            load_teacher(args.run, config.device)
            if METHODS.get(config.method.name).needs_teacher
            else None
        )
        pipeline.distill(prep, args.run, teacher, progress=progress)
        return 0

    if args.command == "calibrate":
        config = _from_run(args.run)
        cal = pipeline.calibrate(
            pipeline.prepare(config, args.run),
            args.run,
            target_delegation_rate=args.target_rate,
            target_accuracy=args.target_accuracy,
        )
        print(
            f"threshold {cal.threshold:.4f} -> delegation {cal.target_delegation_rate:.3f} "
            f"on {cal.split} (n={cal.n})"
        )
        return 0

    if args.command == "evaluate":
        from .evaluate import plot

        curves = {}
        for run in args.runs:
            config = _from_run(run)
            curves[f"{run.name} ({config.method.name})"] = pipeline.evaluate(
                pipeline.prepare(config, run), run
            )
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "curves.json").write_text(json.dumps(curves, indent=2))
        plot(curves, args.out / "curves.png")
        for name, ev in curves.items():
            print(name, json.dumps(ev["summary"]))
        return 0

    if args.command == "export":
        config = _from_run(args.run)
        bundle = pipeline.export(
            pipeline.prepare(config, args.run),
            args.run,
            bundles=args.bundles,
            repository=args.repository,
        )
        print(f"bundle: {bundle.path}  threshold: {bundle.manifest.default_threshold:.4f}")
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
