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
    capture: Annotated[
        Path | None,
        typer.Option(
            help="also distil from captured traffic: the gateway's CASCADE_CAPTURE__DIRECTORY "
            "(shards under DIR/<cascade>/), then calibrate on val + the held-back part",
            exists=True,
            file_okay=False,
        ),
    ] = None,
    capture_holdout: Annotated[
        float, typer.Option(min=0, max=0.9, help="share of captured items held back to calibrate")
    ] = 0.2,
    capture_repeat: Annotated[
        int, typer.Option(min=1, help="each captured training item counts this many times")
    ] = 1,
) -> None:
    """Train a student from the run's teacher (and captured traffic, with --capture)."""
    from .capture_data import load_capture
    from .capture_data import summary as capture_summary
    from .engine import init_distributed
    from .stages import calibrate as calibrate_stage
    from .stages import distill as distill_stage
    from .stages import prepare
    from .teachers import load_teacher

    cfg = _from_run(run, sets)
    if method is not None:  # another method: its own parameters, not the old one's
        cfg = cfg.model_copy(update={"method": MethodConfig(name=method.value)})
    cfg = override(cfg, [f"method.params.{p}" for p in params or []])
    init_distributed(cfg.device)
    prep = prepare(cfg, run)
    mix = None
    if capture is not None:  # checked before anything is written
        mix = load_capture(capture, prep, holdout=capture_holdout, repeat=capture_repeat)
    if _is_rank0():
        (run / RunDir.CONFIG).write_text(dump_config(cfg))
    needs_teacher = METHODS.get(cfg.method.name).needs_teacher
    distill_stage(
        prep, run, load_teacher(run, cfg.device) if needs_teacher else None,
        progress=ctx.obj.progress, capture=mix,
    )  # fmt: skip
    if mix is not None and _is_rank0():  # the last calibration was another student's
        cal = calibrate_stage(prep, run)
        print(json.dumps({"threshold": cal.threshold, "split": cal.split, "n": cal.n,
                          "capture": capture_summary(mix.info)}))  # fmt: skip


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
    out: Annotated[
        Path, typer.Option(help="directory for curves.json, curves.png and frontier.png")
    ] = Path("evaluation"),
) -> None:
    """Accuracy-vs-delegation curves, the accuracy-vs-cost frontier (JSON + PNG) and summaries."""
    from .stages import evaluate as evaluate_stage
    from .stages import plot, plot_frontier, prepare

    curves = {}
    for run in runs:
        cfg = _from_run(run)
        curves[f"{run.name} ({cfg.method.name})"] = evaluate_stage(prepare(cfg, run), run)
    out.mkdir(parents=True, exist_ok=True)
    (out / "curves.json").write_text(json.dumps(curves, indent=2))
    plot(curves, out / "curves.png")
    plot_frontier(curves, out / "frontier.png")
    for name, ev in curves.items():
        print(name, json.dumps(ev["summary"]))


@app.command()
def export(
    run: RunArg,
    bundles: BundlesOpt = Path("bundles"),
    repository: RepositoryOpt = Path("model_repository"),
    sets: SetOpt = None,
) -> None:
    """The cascade bundle and the teacher's Triton model entry (an anytime student's stages as
    tiers, or as one graph with --set export.anytime=graph)."""
    from .stages import export as export_stage
    from .stages import prepare

    cfg = _from_run(run, sets)
    bundle = export_stage(prepare(cfg, run), run, bundles=bundles, repository=repository)
    print(f"bundle: {bundle.path}  threshold: {bundle.manifest.default_threshold:.4f}")


@app.command()
def publish(
    bundle: Annotated[
        Path,
        typer.Argument(help="the bundle to serve (read here: version, cascade)", file_okay=False),
    ],
    gateway: Annotated[str, typer.Option(help="the gateway's URL, e.g. http://127.0.0.1:8000")],
    cascade: Annotated[str | None, typer.Option(help="default: the bundle's name")] = None,
    path_on_gateway: Annotated[
        str | None, typer.Option(help="BUNDLE as the gateway sees it (default: its absolute path)")
    ] = None,
    timeout: Annotated[float, typer.Option(min=0.1, help="seconds for the whole rollout")] = 60.0,
) -> None:
    """Hot-swap a running gateway's student to BUNDLE (PUT /admin/student, the token from
    CASCADE_ADMIN_TOKEN) and wait until it serves it; prints the new and previous version."""
    from .publish import command

    code = command(
        bundle, gateway, cascade=cascade, path_on_gateway=path_on_gateway, timeout_s=timeout
    )
    if code:
        raise typer.Exit(code)


@app.command()
def compose(
    student: Annotated[
        Path, typer.Argument(help="the bundle whose student is stage 0", file_okay=False)
    ],
    tier: Annotated[
        list[Path],
        typer.Option(
            metavar="BUNDLE",
            help="a bundle of the same cascade whose student is the next stage (repeat)",
        ),
    ],
    data: Annotated[
        Path, typer.Option(help="the run directory or experiment YAML of the validation split")
    ],
    out: Annotated[Path, typer.Option(help="the new bundle's directory")],
    tier_name: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME", help="per --tier (default: its student's arch)"),
    ] = None,
    tier_cost: Annotated[
        list[float] | None,
        typer.Option(metavar="COST", help="per --tier, relative to the teacher (default: MACs)"),
    ] = None,
    target_accuracy: Annotated[
        float | None, typer.Option(min=0, max=1, help="cheapest setting reaching this accuracy")
    ] = None,
    cost_budget: Annotated[
        float | None, typer.Option(min=0, help="most accurate setting within this cost per item")
    ] = None,
    repository: RepositoryOpt = Path("model_repository"),
    version: Annotated[str | None, typer.Option(help="default: <student's>-<tier names>")] = None,
    force: Annotated[bool, typer.Option(help="replace --out if it exists")] = False,
    sets: SetOpt = None,
) -> None:
    """An N-stage cascade from bundles: every threshold from the frontier on the validation
    split (default target: the teacher's accuracy alone minus 0.5 pt)."""
    from ..bundle import Bundle
    from .stages import TierSource, compose_data
    from .stages import compose as compose_stage

    names, costs = tier_name or [], tier_cost or []
    for given, what in ((names, "--tier-name"), (costs, "--tier-cost")):
        if given and len(given) != len(tier):
            raise typer.BadParameter(f"give {what} once per --tier or not at all")
    sources = [
        TierSource(path, names[i] if names else None, costs[i] if costs else None)
        for i, path in enumerate(tier)
    ]
    prep = compose_data(data, sets or [], Bundle.load(student))
    bundle = compose_stage(
        student, sources, prep, repository=repository, out=out,
        target_accuracy=target_accuracy, cost_budget=cost_budget, version=version, force=force,
    )  # fmt: skip
    m = bundle.manifest
    thresholds = [m.default_threshold, *(t.threshold for t in m.tiers)]
    shown = ", ".join(f"{n} {t:.4f}" for n, t in zip(bundle.stage_names, thresholds, strict=False))
    print(f"bundle: {bundle.path}  thresholds: {shown}")


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
