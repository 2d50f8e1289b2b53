"""`compose`: an N-stage cascade from bundles already exported. One bundle's student is stage 0;
the students of other bundles of the same cascade (same name, classes and preprocessing, data
split) become its tiers, in order, the teacher last. Every stage's logits on the validation
split (the teacher's from its Triton repository entry, run with ONNX Runtime on the CPU) give
the frontier (frontier.py), and one row of it sets every threshold.

The default target is the cheapest setting whose accuracy reaches the teacher's alone minus
0.5 point on the validation split (the mark `evaluate` reports as
`delegation_to_teacher_minus_0.5pt`: a cascade that costs a fraction of the teacher and loses
at most half a point to it); when no setting reaches it, the most accurate one.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...bundle import (
    STAGE_NAME,
    Bundle,
    Frontier,
    FrontierRow,
    Manifest,
    TextPreprocess,
    TierRef,
)
from ..config import ExperimentConfig, load_config
from ..records import OutputPolicy, RunDir
from ..teachers import OnnxTeacher
from .calibrate import student_calibration
from .frontier import choose_row, frontier, pass_rates
from .prepare import Prepared, prepare

log = logging.getLogger(__name__)

# The default target: the teacher's accuracy alone minus this much.
TEACHER_MARGIN = 0.005


@dataclass(frozen=True)
class TierSource:
    """A bundle whose student becomes a tier; `name` and `cost` override what it records."""

    bundle: Path
    name: str | None = None
    cost: float | None = None


def compose_data(data: Path, sets: Sequence[str], student: Bundle) -> Prepared:
    """The experiment's splits from a run directory (its config.yaml) or an experiment YAML,
    with `--set` overrides. A text cascade encodes with the student bundle's tokenizer (token
    ids mean something only under it); nothing is written to the run directory."""
    if data.is_dir():
        if not (data / RunDir.CONFIG).is_file():
            raise ValueError(f"{data} is not a run directory (no {RunDir.CONFIG})")
        cfg: ExperimentConfig = load_config(data / RunDir.CONFIG, sets)
    else:
        cfg = load_config(data, sets)
    spec = student.manifest.preprocess
    if isinstance(spec, TextPreprocess):
        text = cfg.text.model_copy(update={"tokenizer": student.path / spec.tokenizer_file})
        cfg = cfg.model_copy(update={"text": text})
    return prepare(cfg, None)


def teacher_model(repository: Path, student: Bundle) -> Path:
    """The teacher's ONNX graph in the Triton model repository (the version the manifest
    names, else the highest one there)."""
    ref = student.manifest.teacher
    entry = repository / ref.model_name
    if ref.model_version:
        path = entry / ref.model_version / "model.onnx"
    else:
        versions = sorted((int(p.name) for p in entry.glob("*") if p.name.isdigit()), reverse=True)
        path = entry / str(versions[0] if versions else 1) / "model.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"no teacher graph at {path} (model {ref.model_name})")
    return path


def bundle_logits(bundle: Bundle, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """The bundle's student on the split's inputs (images normalised, texts token ids)."""
    import onnxruntime as ort

    m = bundle.manifest
    session = ort.InferenceSession(str(bundle.student_path), providers=["CPUExecutionProvider"])
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        if isinstance(m.preprocess, TextPreprocess):
            feeds = {
                "input_ids": xb,
                "attention_mask": (xb != m.preprocess.pad_id).astype(np.int64),
            }
        else:
            feeds = {m.student_input: xb}
        out.append(session.run([m.student_output], feeds)[0])
    return np.concatenate(out).astype(np.float32)


def _macs(manifest: Manifest, who: str) -> int | None:
    value = (manifest.training.get(who) or {}).get("macs")
    return int(value) if value else None


def _tier_cost(source: TierSource, tier: Manifest, cascade: Manifest) -> float:
    """Its MACs per MAC of the cascade's teacher, else its own bundle's cost ratio when that
    bundle has the same teacher, else the `--tier-cost` given."""
    if source.cost is not None:
        return source.cost
    macs, teacher_macs = _macs(tier, "student"), _macs(cascade, "teacher")
    if macs and teacher_macs:
        return macs / teacher_macs
    if tier.teacher.model_name == cascade.teacher.model_name and tier.calibration.cost_student:
        return tier.calibration.cost_student
    raise ValueError(
        f"bundle {source.bundle} records no cost relative to the teacher: give --tier-cost"
    )


def _tier_name(source: TierSource, tier: Manifest) -> str:
    name = source.name or str((tier.training.get("student") or {}).get("arch") or "")
    if not re.match(STAGE_NAME, name):
        raise ValueError(
            f"bundle {source.bundle}: tier name {name!r} is not a stage name ({STAGE_NAME}): "
            "give --tier-name"
        )
    return name


def _check_same_cascade(student: Bundle, other: Bundle, prep: Prepared) -> None:
    a, b = student.manifest, other.manifest
    for field in ("name", "modality", "classes", "preprocess"):
        if getattr(a, field) != getattr(b, field):
            raise ValueError(
                f"{other.path} is not of the cascade of {student.path}: its {field} differs"
            )
    if b.tiers:
        raise ValueError(f"{other.path} is an N-stage bundle already: compose two-stage ones")
    if other is not student and (b.output_classes is not None or b.abstain_output is not None):
        raise ValueError(
            f"{other.path}: a tier answers every class of the cascade; this student has "
            "abstain or partial outputs (class-specific students serve as stage 0 only)"
        )
    if b.preprocess != prep.spec:
        raise ValueError(
            f"{other.path} was trained with other preprocessing than the given experiment's "
            f"({b.preprocess} vs {prep.spec})"
        )
    fingerprint = b.training.get("data_fingerprint")
    if fingerprint and fingerprint != prep.fingerprint:
        raise ValueError(
            f"{other.path} was trained on other splits (data fingerprint {fingerprint}, the "
            f"experiment's {prep.fingerprint}): its validation items would not be held out"
        )
    if isinstance(a.preprocess, TextPreprocess):
        tokenizer = a.preprocess.tokenizer_file
        if json.loads((student.path / tokenizer).read_text()) != json.loads(
            (other.path / tokenizer).read_text()
        ):
            raise ValueError(f"{other.path} has another tokenizer than {student.path}")


def pick(
    front: Frontier,
    *,
    teacher_accuracy: float,
    target_accuracy: float | None,
    cost_budget: float | None,
) -> FrontierRow:
    """The row for `--target-accuracy` or `--cost-budget`, else the default (module doc)."""
    if target_accuracy is not None or cost_budget is not None:
        return choose_row(front, target_accuracy=target_accuracy, cost_budget=cost_budget)
    try:
        return choose_row(front, target_accuracy=teacher_accuracy - TEACHER_MARGIN)
    except ValueError:
        best = front.rows[-1]
        log.warning(
            "no setting reaches the teacher's accuracy %.4f minus %.1f pt; the most accurate "
            "one (%.4f) is used",
            teacher_accuracy,
            TEACHER_MARGIN * 100,
            best.cascade_accuracy,
        )
        return best


def compose(
    student_dir: Path,
    sources: Sequence[TierSource],
    prep: Prepared,
    *,
    repository: Path,
    out: Path,
    target_accuracy: float | None = None,
    cost_budget: float | None = None,
    version: str | None = None,
    force: bool = False,
) -> Bundle:
    """The N-stage bundle in `out` (see the module docstring)."""
    if target_accuracy is not None and cost_budget is not None:
        raise ValueError("give a target accuracy or a cost budget, not both")
    if not sources:
        raise ValueError("give at least one tier bundle")
    student = Bundle.load(student_dir)
    tiers = [Bundle.load(s.bundle) for s in sources]
    inputs = {b.path.resolve() for b in (student, *tiers)}
    if out.resolve() in inputs:
        raise ValueError(f"--out {out} is one of the bundles composed")
    if out.exists() and any(out.iterdir()) and not force:
        raise ValueError(f"{out} exists and is not empty (--force replaces it)")
    for bundle in (student, *tiers):
        _check_same_cascade(student, bundle, prep)
    m = student.manifest
    names = [_tier_name(s, t.manifest) for s, t in zip(sources, tiers, strict=True)]
    if len(set(names)) != len(names):
        raise ValueError(f"tier names {names} repeat: give --tier-name for each")
    student_cost = m.calibration.cost_student
    if not student_cost:
        log.warning("the student bundle records no cost relative to the teacher: 0 assumed")
    costs = [student_cost] + [
        _tier_cost(s, t.manifest, m) for s, t in zip(sources, tiers, strict=True)
    ]

    x, labels = prep.x["val"], prep.y["val"]
    policy = OutputPolicy(
        output_classes=m.output_classes,
        abstain_output=m.abstain_output,
        in_domain_outputs=m.in_domain_outputs(),
    )
    teacher = OnnxTeacher(teacher_model(repository, student)).logits(x)
    stage_logits = [bundle_logits(b, x) for b in (student, *tiers)]
    front = frontier(stage_logits, teacher, labels, costs, split="val", policy=policy)
    teacher_accuracy = float((teacher.argmax(1) == labels).mean())
    row = pick(
        front,
        teacher_accuracy=teacher_accuracy,
        target_accuracy=target_accuracy,
        cost_budget=cost_budget,
    )
    passing = pass_rates(row)
    refs = tuple(
        TierRef(
            name=name,
            runtime="onnx",
            file=f"{name}.onnx",
            input_name=t.manifest.student_input,
            output=t.manifest.student_output,
            threshold=row.thresholds[k],
            cost=costs[k],
            pass_rate=passing[k],
        )
        for k, (name, t) in enumerate(zip(names, tiers, strict=True), 1)
    )
    calibration = student_calibration(
        stage_logits[0], teacher, labels, row, cost_student=costs[0], policy=policy
    )
    manifest = Manifest.model_validate(
        {
            **m.model_dump(),
            "version": version or "-".join([m.version, *names]),
            "default_threshold": row.thresholds[0],
            "calibration": calibration.model_dump(),
            "tiers": [r.model_dump() for r in refs],
            "frontier": front.model_dump(),
            "training": {
                **m.training,
                "composed": {
                    "tiers": [
                        {
                            "name": n,
                            "version": t.manifest.version,
                            "method": t.manifest.training.get("method"),
                            "student": t.manifest.training.get("student"),
                            "cost": c,
                        }
                        for n, t, c in zip(names, tiers, costs[1:], strict=True)
                    ],
                    "target": {
                        "accuracy": target_accuracy,
                        "cost_budget": cost_budget,
                        "default": f"teacher accuracy - {TEACHER_MARGIN}"
                        if target_accuracy is None and cost_budget is None
                        else None,
                    },
                    "val_teacher_accuracy": teacher_accuracy,
                },
            },
        }
    )
    if out.exists() and force:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(student.student_path, out / m.student_file)
    if isinstance(m.preprocess, TextPreprocess):
        tokenizer = m.preprocess.tokenizer_file
        shutil.copyfile(student.path / tokenizer, out / tokenizer)
    for ref, tier in zip(refs, tiers, strict=True):
        assert ref.file is not None
        shutil.copyfile(tier.student_path, out / ref.file)
    bundle = Bundle(out, manifest)
    bundle.save()
    return Bundle.load(out)
