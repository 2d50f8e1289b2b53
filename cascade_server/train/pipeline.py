"""The stages of an experiment, each reading and writing one run directory:
teacher -> distill -> calibrate -> evaluate -> export. The CLI, the demo and the benchmark all
go through these functions."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..bundle import (
    TEXT_INPUTS,
    Bundle,
    Calibration,
    ImagePreprocess,
    Manifest,
    StudentStage,
    TeacherRef,
    TextPreprocess,
)
from ..policy import in_domain_mask
from ..preprocess import normalize
from .calibrate import calibrate as calibrate_table
from .calibrate import calibrate_stages
from .config import ExperimentConfig, Recipe, dump_config
from .data import ImageData, TextData, load, split
from .device import device_of, to_device
from .engine import FitConfig, distributed, fit, seed_everything
from .evaluate import evaluate as evaluate_pair
from .export import export_onnx, load_weights, save_weights, teacher_config, write_teacher_entry
from .losses import LOSSES
from .methods import METHODS, Context, Ensemble, StagedOutputs, StudentResult, params_for
from .models import build, count_macs, count_parameters
from .teachers import (
    TEACHER_ONNX,
    OnnxTeacher,
    TorchTeacher,
    load_teacher,
    load_torch_teacher,
    save_torch_teacher,
)

log = logging.getLogger(__name__)
STUDENT_WEIGHTS, STUDENT_META = "student.pt", "student.json"


@dataclass
class Prepared:
    config: ExperimentConfig
    spec: ImagePreprocess | TextPreprocess
    # Per split: float32 NCHW normalised images, or int64 (N, max_length) token ids.
    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    classes: tuple[str, ...]
    fingerprint: str
    tokenizer: Any = None  # text: the trained tokenizers.Tokenizer

    @property
    def modality(self) -> str:
        return self.spec.kind

    @property
    def in_shape(self) -> tuple[int, ...]:
        """(C, H, W) for images; (vocab size, max length) for texts."""
        if isinstance(self.spec, TextPreprocess):
            return (self.tokenizer.get_vocab_size(), self.spec.max_length)
        return (self.spec.channels, self.spec.height, self.spec.width)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fit_config(self, section=None, *, progress: bool = True) -> FitConfig:
        s = section or self.config.fit
        recipe = {f: getattr(s, f) for f in Recipe.model_fields}
        return FitConfig(
            **recipe, seed=self.config.seed, device=self.config.device, progress=progress
        )


def prepare(config: ExperimentConfig, run_dir: Path | None = None) -> Prepared:
    """Loads the data, splits it deterministically by seed, and normalises (images) or
    tokenises (texts) it once. A text run's tokenizer is trained on the training split and kept
    in the run directory, so every later stage encodes with the very same one."""
    data = load(config.data.name, **config.data.params)
    if isinstance(data, TextData):
        return _prepare_text(config, data, run_dir)
    splits = _splits(config, data)
    h, w, c = splits["train"].x.shape[1:]
    if config.preprocess.mean is not None and config.preprocess.std is not None:
        mean, std = tuple(config.preprocess.mean), tuple(config.preprocess.std)
    else:  # measured on the training split only
        pixels = splits["train"].x.reshape(-1, c).astype(np.float64) / 255.0
        mean = tuple(round(float(v), 4) for v in pixels.mean(0))
        std = tuple(round(float(v), 4) for v in np.maximum(pixels.std(0), 1e-3))
    spec = ImagePreprocess(height=h, width=w, channels=c, mean=mean, std=std)
    fp = hashlib.sha256("".join(s.fingerprint() for s in splits.values()).encode()).hexdigest()
    return Prepared(
        config=config,
        spec=spec,
        x={k: normalize(v.x, spec) for k, v in splits.items()},
        y={k: v.y for k, v in splits.items()},
        classes=data.classes,
        fingerprint=fp[:16],
    )


def _splits(config: ExperimentConfig, data: ImageData | TextData) -> dict:
    """train/val/test by seed. With `data.test_params`, the test split is that separate set and
    the carved-out test part goes back to training."""
    parts = split(data, seed=config.seed, val=config.split.val, test=config.split.test)
    if config.data.test_params is None:
        return {"train": parts.train, "val": parts.val, "test": parts.test}
    test = load(config.data.name, **{**config.data.params, **config.data.test_params})
    return {"train": parts.train.concat(parts.test), "val": parts.val, "test": test}


def _prepare_text(config: ExperimentConfig, data: TextData, run_dir: Path | None) -> Prepared:
    from ..preprocess import encode_texts, load_tokenizer
    from .text import normalization_label, train_tokenizer

    splits = _splits(config, data)
    fp = hashlib.sha256("".join(s.fingerprint() for s in splits.values()).encode()).hexdigest()[:16]
    t = config.text
    spec = TextPreprocess(
        max_length=t.max_length,
        lowercase=t.lowercase,
        model=t.model,
        normalization=normalization_label(t.lowercase),
    )
    saved = run_dir / spec.tokenizer_file if run_dir is not None else None
    key = json.dumps([fp, t.model_dump(mode="json")], sort_keys=True)
    if saved is not None and saved.is_file() and (run_dir / "tokenizer.key").read_text() == key:
        tokenizer = load_tokenizer(saved, spec)
    else:
        if t.tokenizer is not None:
            tokenizer = load_tokenizer(t.tokenizer, spec)
        else:
            tokenizer = train_tokenizer(splits["train"].texts, t.vocab_size, t.model, t.lowercase)
        if saved is not None and distributed()[0] == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            tokenizer.save(str(saved))
            (run_dir / "tokenizer.key").write_text(key)
        tokenizer = (
            load_tokenizer(saved, spec)
            if saved is not None and saved.is_file()
            else _configured(tokenizer, spec)
        )
    x = {k: encode_texts(tokenizer, list(v.texts))[0] for k, v in splits.items()}
    return Prepared(
        config=config,
        spec=spec,
        x=x,
        y={k: v.y for k, v in splits.items()},
        classes=data.classes,
        fingerprint=fp,
        tokenizer=tokenizer,
    )


def _configured(tokenizer, spec: TextPreprocess):
    tokenizer.enable_truncation(spec.max_length)
    tokenizer.enable_padding(length=spec.max_length, pad_id=spec.pad_id, pad_token="[PAD]")
    return tokenizer


# ---------------------------------------------------------------- records


def config_key(config: ExperimentConfig, stage: str) -> str:
    """Checkpoints resume only under the configuration that wrote them (for the teacher: the
    sections that shape it)."""
    if stage == "teacher":
        text = json.dumps(
            config.model_dump(
                mode="json", include={"seed", "device", "data", "split", "preprocess", "teacher"}
            ),
            sort_keys=True,
        )
    else:
        text = dump_config(config)
    return hashlib.sha256((text + stage).encode()).hexdigest()[:16]


def update_record(run_dir: Path, **entries: Any) -> dict:
    path = run_dir / "record.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    record.update(entries)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def start_run(run_dir: Path, config: ExperimentConfig, prep: Prepared) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(config))
    update_record(
        run_dir,
        name=config.name,
        seed=config.seed,
        data_fingerprint=prep.fingerprint,
        preprocess=prep.spec.model_dump(),
        torch=torch.__version__,
        python=platform.python_version(),
        world_size=distributed()[1],
    )


# ---------------------------------------------------------------- teacher


def train_teacher(prep: Prepared, run_dir: Path, *, progress: bool = True):
    """Trains the configured teacher, or imports a checkpoint / an ONNX file."""
    cfg = prep.config.teacher
    started = time.perf_counter()
    if cfg.onnx is not None:
        if distributed()[0] == 0:
            shutil.copyfile(cfg.onnx, run_dir / TEACHER_ONNX)
        teacher = OnnxTeacher(
            run_dir / TEACHER_ONNX if (run_dir / TEACHER_ONNX).exists() else cfg.onnx
        )
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
            checkpoint=run_dir / "teacher.ckpt",
            key=config_key(prep.config, "teacher"),
        )
        teacher = TorchTeacher(model, cfg.arch, cfg.params, prep.config.device)
    if isinstance(teacher, TorchTeacher) and distributed()[0] == 0:
        save_torch_teacher(run_dir, teacher, prep.in_shape, prep.num_classes)
    if distributed()[0] == 0:
        logits = teacher_logits(teacher, prep, run_dir)
        update_record(
            run_dir,
            teacher={
                "arch": getattr(teacher, "arch", "onnx"),
                "params": getattr(teacher, "kwargs", {}),
                "source": "onnx" if cfg.onnx else "checkpoint" if cfg.checkpoint else "trained",
                "seconds": round(time.perf_counter() - started, 1),
                **_size(teacher.model if isinstance(teacher, TorchTeacher) else None, prep),
                **{
                    f"{k}_accuracy": float((v.argmax(1) == prep.y[k]).mean())
                    for k, v in logits.items()
                },
            },
        )
    return teacher


def _size(model: nn.Module | None, prep: Prepared) -> dict:
    if model is None:
        return {}
    return {
        "parameters": count_parameters(model),
        "macs": count_macs(model, prep.in_shape, prep.modality),
    }


def teacher_logits(teacher, prep: Prepared, run_dir: Path) -> dict[str, np.ndarray]:
    """Teacher logits on every split, cached in the run directory and keyed by the data
    fingerprint and the teacher file, for methods whose inputs are fixed."""
    source = run_dir / (TEACHER_ONNX if isinstance(teacher, OnnxTeacher) else "teacher.pt")
    key = prep.fingerprint + (_digest(source) if source.is_file() else "memory")
    cache = run_dir / "teacher_logits.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as f:
            if str(f["key"]) == key:
                return {k: f[k] for k in ("train", "val", "test")}
    out = {k: teacher.logits(v) for k, v in prep.x.items()}
    if distributed()[0] == 0 and source.is_file():
        np.savez(cache, key=np.array(key), **out)
    return out


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# ---------------------------------------------------------------- student


def distill(prep: Prepared, run_dir: Path, teacher, *, progress: bool = True) -> StudentResult:
    cfg = prep.config
    method = METHODS.get(cfg.method.name)()
    params = params_for(cfg.method.name, cfg.method.params)
    if method.needs_teacher and teacher is None:
        raise ValueError(f"method {cfg.method.name} needs a teacher")
    logits = teacher_logits(teacher, prep, run_dir) if teacher is not None else None

    def retrain(x: np.ndarray, y: np.ndarray, fold: int):
        t = cfg.teacher
        model = build(t.arch, prep.in_shape, prep.num_classes, **t.params)
        fit_cfg = dataclasses.replace(
            prep.fit_config(t, progress=progress), seed=cfg.seed + 1 + fold
        )
        fit(model, LOSSES.get("ce")(), x, y, fit_cfg, desc=f"crossfit teacher {fold + 1}")
        return TorchTeacher(model, t.arch, t.params, cfg.device)

    ctx = Context(
        x_train=prep.x["train"],
        y_train=prep.y["train"],
        in_shape=prep.in_shape,
        num_classes=prep.num_classes,
        teacher=teacher,
        student_arch=cfg.student.arch,
        student_kwargs=dict(cfg.student.params),
        fit=prep.fit_config(progress=progress),
        teacher_logits=logits["train"] if logits else None,
        retrain_teacher=retrain if cfg.teacher.onnx is None else None,
        checkpoint_dir=run_dir,
        checkpoint_key=config_key(cfg, "student"),
    )
    started = time.perf_counter()
    result = method.train(ctx, params)
    if distributed()[0] == 0:
        save_student(run_dir, result, cfg, params)
        s_logits = student_logits(result.model, prep.x["test"])
        update_record(
            run_dir,
            student={
                "arch": cfg.student.arch,
                "params": cfg.student.params,
                "method": cfg.method.name,
                "method_params": dataclasses.asdict(params),
                "seconds": round(time.perf_counter() - started, 1),
                **_size(result.model, prep),
                "loss_history": [round(v, 5) for v in result.history],
            },
        )
        log.info(
            "student (%s) trained: %d parameters, test logits %s",
            cfg.method.name,
            count_parameters(result.model),
            s_logits.shape,
        )
    return result


def save_student(run_dir: Path, result: StudentResult, cfg: ExperimentConfig, params) -> None:
    save_weights(result.model, run_dir / STUDENT_WEIGHTS)
    meta = {
        "arch": cfg.student.arch,
        "kwargs": cfg.student.params,
        "method": cfg.method.name,
        "method_params": dataclasses.asdict(params),
        "output_classes": result.output_classes,
        "abstain_output": result.abstain_output,
        "in_domain_classes": result.in_domain_classes,
        "stages": result.stages,
    }
    if isinstance(result.model, Ensemble):
        meta["ensemble"] = {
            "members": len(result.model.members),
            "connect": result.model.connect,
            "member_kwargs": dataclasses.asdict(params).get("member_kwargs", {}),
        }
    (run_dir / STUDENT_META).write_text(json.dumps(meta, indent=2))


def load_student(run_dir: Path, prep: Prepared) -> tuple[nn.Module, dict]:
    meta = json.loads((run_dir / STUDENT_META).read_text())
    outputs = len(meta["output_classes"]) if meta["output_classes"] else prep.num_classes
    if "ensemble" in meta:
        e = meta["ensemble"]
        kwargs = {**meta["kwargs"], **e["member_kwargs"]}
        members = []
        for t in range(e["members"]):
            m = build(meta["arch"], prep.in_shape, outputs, **kwargs)
            if e["connect"] and t > 0:
                m.head = nn.Linear(m.feature_dim + members[-1].feature_dim, outputs)
            members.append(m)
        model: nn.Module = Ensemble(members, [1.0] * len(members), e["connect"])
    else:
        model = build(meta["arch"], prep.in_shape, outputs, **meta["kwargs"])
    return load_weights(model, run_dir / STUDENT_WEIGHTS), meta


@torch.no_grad()
def student_logits(model: nn.Module, x: np.ndarray, stages: bool = False):
    model.eval()
    device = device_of(model)
    chunks = []
    for i in range(0, len(x), 512):
        xb = to_device(x[i : i + 512], device)
        if stages:
            chunks.append([s.float().cpu().numpy() for s in model.stages(xb)])
        else:
            chunks.append([model(xb).float().cpu().numpy()])
    return (
        [np.concatenate(parts) for parts in zip(*chunks, strict=True)]
        if stages
        else np.concatenate([c[0] for c in chunks])
    )


def _policy(meta: dict, num_classes: int) -> dict:
    mapping = meta["output_classes"]
    return {
        "output_classes": mapping,
        "abstain_output": meta["abstain_output"],
        "in_domain_outputs": in_domain_mask(meta["in_domain_classes"], mapping, num_classes),
    }


def _costs(run_dir: Path) -> float:
    record = json.loads((run_dir / "record.json").read_text())
    s, t = record.get("student", {}).get("macs"), record.get("teacher", {}).get("macs")
    return s / t if s and t else 0.0


# ---------------------------------------------------------------- calibrate, evaluate


def _pair_logits(prep: Prepared, run_dir: Path, split_name: str):
    """The run's student meta, student and teacher logits on one split, and the student's
    per-stage logits when it is an anytime ensemble (else None)."""
    model, meta = load_student(run_dir, prep)
    x = prep.x[split_name]
    t_logits = teacher_logits(load_teacher(run_dir), prep, run_dir)[split_name]
    stage_logits = student_logits(model, x, stages=True) if meta.get("stages", 1) > 1 else None
    s_logits = stage_logits[-1] if stage_logits is not None else student_logits(model, x)
    return meta, s_logits, t_logits, stage_logits


def calibrate(
    prep: Prepared,
    run_dir: Path,
    *,
    target_delegation_rate: float | None = None,
    target_accuracy: float | None = None,
) -> Calibration:
    cfg = prep.config.calibration
    if target_delegation_rate is None and target_accuracy is None:  # the config decides
        target_delegation_rate, target_accuracy = cfg.target_delegation_rate, cfg.target_accuracy
    meta, s_logits, t_logits, stage_logits = _pair_logits(prep, run_dir, "val")
    calibration = calibrate_table(
        s_logits,
        t_logits,
        prep.y["val"],
        target_delegation_rate=target_delegation_rate if target_accuracy is None else None,
        target_accuracy=target_accuracy,
        cost_student=_costs(run_dir),
        split="val",
        **_policy(meta, prep.num_classes),
    )
    stages = []
    if stage_logits is not None:
        names = [f"stage_{k + 1}" for k in range(len(stage_logits))]
        stages = calibrate_stages(stage_logits, calibration.target_delegation_rate, names)
    (run_dir / "calibration.json").write_text(calibration.model_dump_json(indent=2))
    (run_dir / "stages.json").write_text(json.dumps([s.model_dump() for s in stages], indent=2))
    update_record(
        run_dir,
        calibration={
            "threshold": calibration.threshold,
            "target_delegation_rate": calibration.target_delegation_rate,
            "val_student_accuracy": calibration.student_accuracy,
            "val_teacher_accuracy": calibration.teacher_accuracy,
            "stages": [s.model_dump() for s in stages],
        },
    )
    return calibration


def evaluate(prep: Prepared, run_dir: Path) -> dict:
    meta, s_logits, t_logits, stage_logits = _pair_logits(prep, run_dir, "test")
    result = evaluate_pair(
        s_logits,
        t_logits,
        prep.y["test"],
        cost_student=_costs(run_dir),
        **_policy(meta, prep.num_classes),
    )
    if stage_logits is not None:  # anytime accuracy after each member
        result["summary"]["stage_accuracy"] = [
            float((s.argmax(1) == prep.y["test"]).mean()) for s in stage_logits
        ]
    (run_dir / "evaluation.json").write_text(json.dumps(result, indent=2))
    update_record(run_dir, evaluation=result["summary"])
    return result


# ---------------------------------------------------------------- export


def export(prep: Prepared, run_dir: Path, *, bundles: Path, repository: Path) -> Bundle:
    """The cascade bundle (ONNX student + manifest with calibration) and the teacher's Triton
    model-repository entry (ONNX + config.pbtxt with dynamic batching)."""
    cfg = prep.config
    if not (run_dir / "calibration.json").is_file():
        calibrate(prep, run_dir)
    calibration = Calibration.model_validate_json((run_dir / "calibration.json").read_text())
    stages_path = run_dir / "stages.json"
    stages = (
        [StudentStage(**s) for s in json.loads(stages_path.read_text())]
        if stages_path.is_file()
        else []
    )
    model, meta = load_student(run_dir, prep)
    teacher_name = cfg.export.teacher_name or f"{cfg.export.name}_teacher"
    teacher = load_teacher(run_dir)
    if isinstance(teacher, TorchTeacher):
        write_teacher_entry(
            repository,
            teacher_name,
            teacher.model,
            prep.in_shape,
            prep.num_classes,
            max_batch_size=cfg.export.max_batch_size,
            modality=prep.modality,
        )
        save_weights(teacher.model, repository / teacher_name / "1" / "teacher.pt")
        t_in, t_out = "input", "logits"
        t_text = TEXT_INPUTS
    else:
        from ..triton import write_model_config

        (repository / teacher_name / "1").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / TEACHER_ONNX, repository / teacher_name / "1" / "model.onnx")
        t_in, t_out = teacher.input_name, teacher.output_name
        t_text = tuple(teacher.input_names[:2]) if prep.modality == "text" else TEXT_INPUTS
        write_model_config(
            teacher_config(
                teacher_name,
                prep.in_shape,
                prep.num_classes,
                input_name=t_in,
                output_name=t_out,
                max_batch_size=cfg.export.max_batch_size,
                modality=prep.modality,
                text_inputs=t_text,
            ),
            repository / teacher_name / "config.pbtxt",
        )
    version = (
        cfg.export.version
        or f"{cfg.export.name}-{cfg.method.name}-{prep.fingerprint[:8]}-s{cfg.seed}"
    )
    record = json.loads((run_dir / "record.json").read_text())
    manifest = Manifest(
        name=cfg.export.name,
        version=version,
        modality=prep.modality,
        classes=prep.classes,
        preprocess=prep.spec,
        output_classes=tuple(meta["output_classes"]) if meta["output_classes"] else None,
        abstain_output=meta["abstain_output"],
        in_domain_classes=tuple(meta["in_domain_classes"]) if meta["in_domain_classes"] else None,
        stages=tuple(stages),
        default_threshold=calibration.threshold,
        calibration=calibration,
        teacher=TeacherRef(
            model_name=teacher_name,
            model_version="1",
            input_name=t_in,
            text_inputs=t_text,
            output_name=t_out,
            max_batch_size=cfg.export.max_batch_size,
        ),
        training={
            "method": cfg.method.name,
            "params": meta["method_params"],
            "dataset": cfg.data.name,
            "data_fingerprint": prep.fingerprint,
            "seed": cfg.seed,
            "student": {"arch": meta["arch"], **meta["kwargs"], **record.get("student", {})},
            "teacher": record.get("teacher", {}),
            "test": record.get("evaluation", {}),
        },
    )
    for key in ("loss_history",):
        manifest.training["student"].pop(key, None)
    bundle_dir = bundles / cfg.export.name
    staged = isinstance(model, Ensemble) and stages
    export_onnx(
        StagedOutputs(model) if staged else model,
        prep.in_shape,
        bundle_dir / manifest.student_file,
        modality=prep.modality,
        output_name=["logits", *[s.output for s in stages]] if staged else "logits",
    )
    if prep.tokenizer is not None:
        prep.tokenizer.save(str(bundle_dir / prep.spec.tokenizer_file))
    bundle = Bundle(bundle_dir, manifest)
    bundle.save()
    save_weights(model, bundle_dir / STUDENT_WEIGHTS)
    shutil.copyfile(run_dir / STUDENT_META, bundle_dir / STUDENT_META)
    return bundle


def run_all(
    config: ExperimentConfig,
    run_dir: Path,
    *,
    bundles: Path | None = None,
    repository: Path | None = None,
    progress: bool = True,
) -> dict:
    """Every stage for one experiment file."""
    prep = prepare(config, run_dir)
    rank = distributed()[0]
    if rank == 0:
        start_run(run_dir, config, prep)
    teacher = train_teacher(prep, run_dir, progress=progress)
    distill(prep, run_dir, teacher, progress=progress)
    if rank > 0:
        return {}
    calibrate(prep, run_dir)
    evaluation = evaluate(prep, run_dir)
    if bundles is not None and repository is not None:
        export(prep, run_dir, bundles=bundles, repository=repository)
    return evaluation
