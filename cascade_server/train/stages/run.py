"""`run`: every stage of one experiment in one process, the trained teacher and student passed
from stage to stage in memory (the separate commands reload them from the run directory)."""

from __future__ import annotations

from pathlib import Path

from ..config import ExperimentConfig
from ..engine import distributed
from .calibrate import calibrate
from .distill import Pair, distill
from .evaluate import evaluate
from .export import export
from .prepare import prepare, start_run
from .teacher import train_teacher


def run_all(
    config: ExperimentConfig,
    run_dir: Path,
    *,
    bundles: Path | None = None,
    repository: Path | None = None,
    progress: bool = True,
) -> dict:
    """Teacher, distill, calibrate, evaluate (and export when `bundles` and `repository` are
    given). Returns the evaluation; empty on ranks > 0 under torchrun (rank 0 finishes)."""
    prep = prepare(config, run_dir)
    rank = distributed()[0]
    if rank == 0:
        start_run(run_dir, config, prep)
    teacher = train_teacher(prep, run_dir, progress=progress)
    student = distill(prep, run_dir, teacher, progress=progress)
    if rank > 0:
        return {}
    pair = Pair(student, teacher)
    calibrate(prep, run_dir, pair=pair)
    evaluation = evaluate(prep, run_dir, pair=pair)
    if bundles is not None and repository is not None:
        export(prep, run_dir, bundles=bundles, repository=repository, pair=pair)
    return evaluation
