"""The stages of an experiment, each reading and writing one run directory:
prepare -> teacher -> distill -> calibrate -> evaluate -> export, and `run` for all of them.
The CLI, the demo and the benchmarks all go through these functions."""

from .calibrate import calibrate, calibrate_logits, calibrate_stages, cascade_rows
from .compose import TierSource, compose, compose_data
from .distill import Pair, Student, distill, load_student, pair_logits, student_logits
from .evaluate import evaluate, evaluate_logits, frontier_curves, plot, plot_frontier, summarize
from .export import export, teacher_config, write_teacher_entry
from .frontier import choose_row, frontier, grid_counts
from .prepare import Prepared, config_key, prepare, start_run
from .run import run_all
from .teacher import teacher_logits, train_teacher

__all__ = [
    "Pair",
    "Prepared",
    "Student",
    "TierSource",
    "calibrate",
    "calibrate_logits",
    "calibrate_stages",
    "cascade_rows",
    "choose_row",
    "compose",
    "compose_data",
    "config_key",
    "distill",
    "evaluate",
    "evaluate_logits",
    "export",
    "frontier",
    "frontier_curves",
    "grid_counts",
    "load_student",
    "pair_logits",
    "plot",
    "plot_frontier",
    "prepare",
    "run_all",
    "start_run",
    "student_logits",
    "summarize",
    "teacher_config",
    "teacher_logits",
    "train_teacher",
    "write_teacher_entry",
]
