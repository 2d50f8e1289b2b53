"""cascade-train: teachers, distilled students, calibration, evaluation and export.

One experiment = one YAML file (configs/...). Each command reads and writes a run directory
(default runs/<experiment name>), so the stages can be run one by one or all at once with `run`.
Under `torchrun` training uses DistributedDataParallel.
"""

from __future__ import annotations

import enum
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from .config import ExperimentConfig, MethodConfig, dump_config, load_config, override
from .methods import METHODS, describe_methods
from .records import RunDir

app = typer.Typer(
    name="cascade-train",
    help=__doc__,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

Method = enum.Enum("Method", {name: name for name in METHODS.names()}, type=str)  # type: ignore[misc]


class Device(enum.StrEnum):
    cpu = "cpu"
    cuda = "cuda"


ConfigArg = Annotated[
    Path, typer.Argument(help="experiment YAML (configs/...)", exists=True, dir_okay=False)
]
RunArg = Annotated[
    Path, typer.Argument(help="a run directory made by `teacher` or `run`", file_okay=False)
]
RunDirOpt = Annotated[Path | None, typer.Option(help="run directory (default: runs/<name>)")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set fit.epochs=5 (repeatable)",
    ),
]
DeviceOpt = Annotated[Device | None, typer.Option(help="override the config's device")]
BundlesOpt = Annotated[Path, typer.Option(help="where the cascade bundle goes")]
RepositoryOpt = Annotated[Path, typer.Option(help="Triton model repository for the teacher")]


@dataclass(frozen=True)
class Options:
    progress: bool


@app.callback()
def common(
    ctx: typer.Context,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="no progress bars")] = False,
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # The ONNX exporter narrates every optimisation pass.
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    ctx.obj = Options(progress=not no_progress)


def _experiment(
    config: Path, run_dir: Path | None, sets: list[str] | None, device: Device | None
) -> tuple[ExperimentConfig, Path]:
    cfg = load_config(config, sets or [])
    if device is not None:
        cfg = cfg.model_copy(update={"device": device.value})
    return cfg, run_dir or Path("runs") / cfg.name


def _from_run(run: Path, sets: list[str] | None = None) -> ExperimentConfig:
    if not (run / RunDir.CONFIG).is_file():
        raise typer.BadParameter(f"{run} is not a run directory (no config.yaml)")
    return load_config(run / RunDir.CONFIG, sets or [])


def _is_rank0() -> bool:
    from .engine import distributed

    return distributed()[0] == 0


@app.command()
def run(
    ctx: typer.Context,
    config: ConfigArg,
    run_dir: RunDirOpt = None,
    sets: SetOpt = None,
    device: DeviceOpt = None,
    export: Annotated[bool, typer.Option(help="also export bundle + Triton entry")] = False,
    bundles: BundlesOpt = Path("bundles"),
    repository: RepositoryOpt = Path("model_repository"),
) -> None:
    """Every stage of one experiment: teacher, distill, calibrate, evaluate (export with
    --export), the trained models passed on in memory."""
    from .engine import init_distributed
    from .stages import run_all

    cfg, directory = _experiment(config, run_dir, sets, device)
    init_distributed(cfg.device)
    evaluation = run_all(
        cfg,
        directory,
        progress=ctx.obj.progress,
        bundles=bundles if export else None,
        repository=repository if export else None,
    )
    if _is_rank0():
        print(json.dumps(evaluation["summary"], indent=2))


@app.command()
def teacher(
    ctx: typer.Context,
    config: ConfigArg,
    run_dir: RunDirOpt = None,
    sets: SetOpt = None,
    device: DeviceOpt = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="import a state-dict checkpoint of the config's teacher architecture"),
    ] = None,
    onnx: Annotated[
        Path | None, typer.Option(help="import an ONNX classifier as the teacher")
    ] = None,
) -> None:
    """Train the teacher, or import a checkpoint or an ONNX file."""
    from .engine import init_distributed
    from .stages import prepare, start_run, train_teacher

    cfg, directory = _experiment(config, run_dir, sets, device)
    if checkpoint or onnx:
        imported = cfg.teacher.model_copy(update={"checkpoint": checkpoint, "onnx": onnx})
        cfg = cfg.model_copy(update={"teacher": imported})
    init_distributed(cfg.device)
    prep = prepare(cfg, directory)
    if _is_rank0():
        start_run(directory, cfg, prep)
    train_teacher(prep, directory, progress=ctx.obj.progress)


# \b keeps click from rewrapping the table.
@app.command(epilog="methods and their parameters:\n\n\b\n" + describe_methods())
def distill(
    ctx: typer.Context,
    run: RunArg,
    method: Annotated[Method | None, typer.Option(help="override the config's method")] = None,
    params: Annotated[
        list[str] | None,
        typer.Option(
            "--param", metavar="KEY=VALUE", help="a method parameter, e.g. --param temperature=2"
        ),
    ] = None,
    sets: SetOpt = None,
) -> None:
    """Train a student from the run's teacher."""
    from .engine import init_distributed
    from .stages import distill as distill_stage
    from .stages import prepare
    from .teachers import load_teacher

    cfg = _from_run(run, sets)
    if method is not None:  # another method: its own parameters, not the old one's
        cfg = cfg.model_copy(update={"method": MethodConfig(name=method.value)})
    cfg = override(cfg, [f"method.params.{p}" for p in params or []])
    init_distributed(cfg.device)
    prep = prepare(cfg, run)
    if _is_rank0():
        (run / RunDir.CONFIG).write_text(dump_config(cfg))
    needs_teacher = METHODS.get(cfg.method.name).needs_teacher
    distill_stage(
        prep, run, load_teacher(run, cfg.device) if needs_teacher else None,
        progress=ctx.obj.progress,
    )  # fmt: skip


@app.command()
def calibrate(
    run: RunArg,
    target_rate: Annotated[
        float | None, typer.Option(min=0, max=1, help="target delegation rate (0..1)")
    ] = None,
    target_accuracy: Annotated[
        float | None, typer.Option(min=0, max=1, help="target cascade accuracy (0..1)")
    ] = None,
) -> None:
    """The threshold table on the held-out split, and the threshold for a target."""
    from .stages import calibrate as calibrate_stage
    from .stages import prepare

    if target_rate is not None and target_accuracy is not None:
        raise typer.BadParameter("give --target-rate or --target-accuracy, not both")
    cfg = _from_run(run)
    cal = calibrate_stage(
        prepare(cfg, run), run, target_delegation_rate=target_rate, target_accuracy=target_accuracy
    )
    print(
        f"threshold {cal.threshold:.4f} -> delegation {cal.target_delegation_rate:.3f} "
        f"on {cal.split} (n={cal.n})"
    )


@app.command()
def evaluate(
    runs: Annotated[list[Path], typer.Argument(help="run directories to compare on one plot")],
    out: Annotated[Path, typer.Option(help="directory for curves.json and curves.png")] = Path(
        "evaluation"
    ),
) -> None:
    """Accuracy-vs-delegation curves (JSON + PNG) and summaries."""
    from .stages import evaluate as evaluate_stage
    from .stages import plot, prepare

    curves = {}
    for run in runs:
        cfg = _from_run(run)
        curves[f"{run.name} ({cfg.method.name})"] = evaluate_stage(prepare(cfg, run), run)
    out.mkdir(parents=True, exist_ok=True)
    (out / "curves.json").write_text(json.dumps(curves, indent=2))
    plot(curves, out / "curves.png")
    for name, ev in curves.items():
        print(name, json.dumps(ev["summary"]))


@app.command()
def export(
    run: RunArg,
    bundles: BundlesOpt = Path("bundles"),
    repository: RepositoryOpt = Path("model_repository"),
) -> None:
    """The cascade bundle and the teacher's Triton model entry."""
    from .stages import export as export_stage
    from .stages import prepare

    cfg = _from_run(run)
    bundle = export_stage(prepare(cfg, run), run, bundles=bundles, repository=repository)
    print(f"bundle: {bundle.path}  threshold: {bundle.manifest.default_threshold:.4f}")


@app.command()
def methods() -> None:
    """List the distillation methods and their parameters."""
    print(describe_methods())


@app.command()
def demo(
    ctx: typer.Context,
    bundles: BundlesOpt = Path("bundles"),
    repository: RepositoryOpt = Path("model_repository"),
    force: Annotated[bool, typer.Option(help="rebuild even if it exists")] = False,
) -> None:
    """Train, calibrate and export the demo cascades (digits images, intents texts)."""
    from .demo import build_demos

    for bundle in build_demos(repository, bundles, progress=ctx.obj.progress, force=force):
        print(f"bundle: {bundle.path}  threshold: {bundle.manifest.default_threshold:.4f}")


def main(argv: list[str] | None = None) -> int:
    """The console script. Usage errors and bad configurations exit 2 with one clear line."""
    from .engine import shutdown_distributed

    command = typer.main.get_command(app)
    try:
        # Standalone: usage errors print the usage and exit 2 through SystemExit.
        command.main(args=argv, prog_name="cascade-train")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except (ValueError, ValidationError, FileNotFoundError) as e:
        print(f"cascade-train: error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()  # under torchrun: leave the process group cleanly
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
