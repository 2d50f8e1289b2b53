"""The teacher stage: train the configured teacher, or import a checkpoint or an ONNX file; and
its logits on every split, cached in the run directory."""

from __future__ import annotations

import functools
import hashlib
import shutil
import time
from pathlib import Path

import numpy as np
from torch import nn

from ..engine import distributed, fit, seed_everything
from ..losses import LOSSES
from ..models import build, count_macs, count_parameters
from ..records import RunDir, TeacherSummary
from ..teachers import OnnxTeacher, TorchTeacher, load_torch_teacher, save_torch_teacher
from .prepare import Prepared, config_key


def train_teacher(
    prep: Prepared, run_dir: Path, *, progress: bool = True
) -> TorchTeacher | OnnxTeacher:
    """Trains the configured teacher, or imports a checkpoint / an ONNX file."""
    cfg = prep.config.teacher
    run = RunDir(run_dir)
    rank = distributed()[0]
    started = time.perf_counter()
    teacher: TorchTeacher | OnnxTeacher
    if cfg.onnx is not None:
        if rank == 0:
            shutil.copyfile(cfg.onnx, run / RunDir.TEACHER_ONNX)
        copied = run / RunDir.TEACHER_ONNX
        teacher = OnnxTeacher(copied if copied.exists() else cfg.onnx, device=prep.config.device)
    elif cfg.checkpoint is not None:
        teacher = load_torch_teacher(
            cfg.checkpoint,
            cfg.arch,
            cfg.params,
            prep.in_shape,
            prep.num_classes,
            prep.config.device,
        )
    else:
        seed_everything(prep.config.seed)
        model = build(cfg.arch, prep.in_shape, prep.num_classes, **cfg.params)
        fit(
            model,
            LOSSES.get("ce")(label_smoothing=cfg.label_smoothing),
            prep.x["train"],
            prep.y["train"],
            prep.fit_config(cfg, progress=progress),
            desc="teacher",
            checkpoint=run / "teacher.ckpt",
            key=config_key(prep.config, "teacher"),
        )
        teacher = TorchTeacher(model, cfg.arch, cfg.params, prep.config.device)
    if rank > 0:
        return teacher
    if isinstance(teacher, TorchTeacher):
        save_torch_teacher(run_dir, teacher, prep.in_shape, prep.num_classes)
    logits = teacher_logits(teacher, prep, run_dir)
    accuracy = {k: float((v.argmax(1) == prep.y[k]).mean()) for k, v in logits.items()}
    run.update_record(
        teacher=TeacherSummary(
            arch=teacher.arch if isinstance(teacher, TorchTeacher) else "onnx",
            params=teacher.kwargs if isinstance(teacher, TorchTeacher) else {},
            source="onnx" if cfg.onnx else "checkpoint" if cfg.checkpoint else "trained",
            seconds=round(time.perf_counter() - started, 1),
            **model_size(teacher.model if isinstance(teacher, TorchTeacher) else None, prep),
            train_accuracy=accuracy["train"],
            val_accuracy=accuracy["val"],
            test_accuracy=accuracy["test"],
        )
    )
    return teacher


def model_size(model: nn.Module | None, prep: Prepared) -> dict[str, int]:
    if model is None:
        return {}
    return {
        "parameters": count_parameters(model),
        "macs": count_macs(model, prep.in_shape, prep.modality),
    }


def teacher_logits(
    teacher: TorchTeacher | OnnxTeacher, prep: Prepared, run_dir: Path
) -> dict[str, np.ndarray]:
    """Teacher logits on every split, cached in the run directory and keyed by the data
    fingerprint and the teacher file, for methods whose inputs are fixed."""
    run = RunDir(run_dir)
    source = run / (
        RunDir.TEACHER_ONNX if isinstance(teacher, OnnxTeacher) else RunDir.TEACHER_WEIGHTS
    )
    key = prep.fingerprint + (_digest(source) if source.is_file() else "memory")
    cache = run / RunDir.TEACHER_LOGITS
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as f:
            if str(f["key"]) == key:
                return {k: f[k] for k in ("train", "val", "test")}
    out = {k: teacher.logits(v) for k, v in prep.x.items()}
    if distributed()[0] == 0 and source.is_file():
        np.savez(cache, key=np.array(key), **out)
    return out


def _digest(path: Path) -> str:
    # Every stage asks for the teacher's logits: hash a (possibly large) teacher file once per
    # version of it, not once per stage.
    stat = path.stat()
    return _digest_of(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _digest_of(path: Path, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]
