"""The stages of an experiment, each reading and writing one run directory:
prepare -> teacher -> distill -> calibrate -> evaluate -> export, and `run` for all of them.
The CLI, the demo and the benchmarks all go through these functions."""

from .calibrate import calibrate, calibrate_logits, calibrate_stages, cascade_rows
from .distill import Pair, Student, distill, load_student, pair_logits, student_logits
from .evaluate import evaluate, evaluate_logits, plot, summarize
from .export import export, teacher_config, write_teacher_entry
from .prepare import Prepared, config_key, prepare, start_run
from .run import run_all
from .teacher import teacher_logits, train_teacher

__all__ = [
    "Pair",
    "Prepared",
    "Student",
    "calibrate",
    "calibrate_logits",
    "calibrate_stages",
    "cascade_rows",
    "config_key",
    "distill",
    "evaluate",
    "evaluate_logits",
    "export",
    "load_student",
    "pair_logits",
    "plot",
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
