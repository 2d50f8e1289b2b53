"""The distill stage: a student trained from the run's teacher by the configured method, saved as
student.pt + student.json; and the student's (and its teacher's) logits for the later stages."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..capture_data import CaptureMix, check_method, clear_state, save_state
from ..device import chunked, device_of
from ..engine import distributed, fit
from ..losses import LOSSES
from ..methods import METHODS, Context, Ensemble, build_ensemble, params_for
from ..models import build
from ..records import EnsembleMeta, OutputPolicy, RunDir, StudentMeta, StudentSummary
from ..teachers import OnnxTeacher, TorchTeacher, load_teacher
from ..weights import load_weights, save_weights
from .prepare import Prepared, config_key
from .teacher import model_size, teacher_logits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Student:
    model: nn.Module
    meta: StudentMeta


@dataclass(frozen=True)
class Pair:
    """A trained student and its teacher: `run` passes them on in memory; the separate commands
    load them from the run directory."""

    student: Student
    teacher: TorchTeacher | OnnxTeacher

    @classmethod
    def load(cls, prep: Prepared, run_dir: Path) -> Pair:
        return cls(load_student(run_dir, prep), load_teacher(run_dir))


@dataclass(frozen=True)
class PairLogits:
    student: np.ndarray  # the (last stage of the) student
    teacher: np.ndarray
    stages: list[np.ndarray] | None  # an anytime student's logits per stage, else None
    policy: OutputPolicy


def distill(
    prep: Prepared,
    run_dir: Path,
    teacher: TorchTeacher | OnnxTeacher | None,
    *,
    progress: bool = True,
    capture: CaptureMix | None = None,
) -> Student:
    """`capture`: captured items mixed into the training split (capture_data.py); recorded in
    the run directory for calibrate and export. Without it, a previous capture is forgotten."""
    cfg = prep.config
    method = METHODS.get(cfg.method.name)()
    params = params_for(cfg.method.name, cfg.method.params)
    if method.needs_teacher and teacher is None:
        raise ValueError(f"method {cfg.method.name} needs a teacher")
    logits = teacher_logits(teacher, prep, run_dir) if teacher is not None else None
    x_train, y_train = prep.x["train"], prep.y["train"]
    train_logits = logits["train"] if logits else None
    key = config_key(cfg, "student")
    if capture is not None:
        check_method(cfg.method.name, cfg.method.params)
        x_train, y_train, train_logits = capture.mix(x_train, y_train, train_logits)
        key += capture.fingerprint  # a checkpoint without these items does not resume

    def retrain(x: np.ndarray, y: np.ndarray, fold: int) -> TorchTeacher:
        t = cfg.teacher
        model = build(t.arch, prep.in_shape, prep.num_classes, **t.params)
        fit_cfg = dataclasses.replace(
            prep.fit_config(t, progress=progress), seed=cfg.seed + 1 + fold
        )
        fit(model, LOSSES.get("ce")(), x, y, fit_cfg, desc=f"crossfit teacher {fold + 1}")
        return TorchTeacher(model, t.arch, t.params, cfg.device)

    ctx = Context(
        x_train=x_train,
        y_train=y_train,
        in_shape=prep.in_shape,
        num_classes=prep.num_classes,
        teacher=teacher,
        student_arch=cfg.student.arch,
        student_kwargs=dict(cfg.student.params),
        fit=prep.fit_config(progress=progress),
        teacher_logits=train_logits,
        retrain_teacher=retrain if cfg.teacher.onnx is None else None,
        checkpoint_dir=run_dir,
        checkpoint_key=key,
    )
    started = time.perf_counter()
    result = method.train(ctx, params)
    method_params = dataclasses.asdict(params)
    meta = StudentMeta(
        arch=cfg.student.arch,
        kwargs=cfg.student.params,
        method=cfg.method.name,
        method_params=method_params,
        output_classes=result.output_classes,
        abstain_output=result.abstain_output,
        in_domain_classes=result.in_domain_classes,
        stages=result.stages,
        ensemble=EnsembleMeta(
            members=len(result.model.members),
            connect=result.model.connect,
            member_kwargs=method_params.get("member_kwargs", {}),
        )
        if isinstance(result.model, Ensemble)
        else None,
    )
    if distributed()[0] == 0:
        run = RunDir(run_dir)
        save_weights(result.model, run / RunDir.STUDENT_WEIGHTS)
        run.write_student_meta(meta)
        if capture is not None:
            save_state(run_dir, capture)
        else:
            clear_state(run_dir)
        run.update_record(
            capture=capture.info if capture is not None else None,
            student=StudentSummary(
                arch=cfg.student.arch,
                params=cfg.student.params,
                method=cfg.method.name,
                method_params=method_params,
                seconds=round(time.perf_counter() - started, 1),
                **model_size(result.model, prep),
                loss_history=[round(v, 5) for v in result.history],
            ),
        )
        log.info("student (%s) trained and saved in %s", cfg.method.name, run_dir)
    return Student(result.model, meta)


def load_student(run_dir: Path, prep: Prepared) -> Student:
    run = RunDir(run_dir)
    meta = run.student_meta()
    outputs = meta.outputs(prep.num_classes)
    model: nn.Module
    if meta.ensemble is not None:
        e = meta.ensemble
        kwargs = {**meta.kwargs, **e.member_kwargs}
        model = build_ensemble(meta.arch, prep.in_shape, outputs, kwargs, e.members, e.connect)
    else:
        model = build(meta.arch, prep.in_shape, outputs, **meta.kwargs)
    return Student(load_weights(model, run / RunDir.STUDENT_WEIGHTS), meta)


def student_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    return chunked(model, x, device_of(model))


def stage_logits(model: Ensemble, x: np.ndarray) -> list[np.ndarray]:
    """An anytime ensemble's cumulative logits after each member."""
    model.eval()
    stacked = chunked(lambda xb: torch.stack(model.stages(xb), 1), x, device_of(model))
    return [stacked[:, k] for k in range(stacked.shape[1])]


def pair_logits(prep: Prepared, run: RunDir, split: str, pair: Pair | None = None) -> PairLogits:
    """Student and teacher logits on one split, and the student's per-stage logits when it is
    an anytime ensemble."""
    pair = pair or Pair.load(prep, run.path)
    x = prep.x[split]
    model = pair.student.model
    stages = (
        stage_logits(model, x)
        if pair.student.meta.stages > 1 and isinstance(model, Ensemble)
        else None
    )
    return PairLogits(
        student=stages[-1] if stages is not None else student_logits(model, x),
        teacher=teacher_logits(pair.teacher, prep, run.path)[split],
        stages=stages,
        policy=pair.student.meta.policy(prep.num_classes),
    )
