"""Captured traffic as training data: `cascade-train distill --capture DIR`.

The gateway's capture shards (cascade_server/capture.py) hold the student's preprocessed inputs
and the teacher's probabilities for delegated items and shadow samples. Here they are checked
against the run (cascade, modality, classes, tensor space), turned into the arrays `prepare`
makes, split into a part for training and a part held back for calibration, and recorded in
the run directory, so that `calibrate` and `export` (run later, as separate commands) see the
same items:

    capture.json          what was used: shards (name, items, digest), counts, fingerprint
    capture_holdout.npz   the held-back items, in the training tensor space

Tensor spaces. Images: the gateway stores `normalize(uint8, spec)` (float32 NCHW), the very
function `prepare` applies to the training images; a capture made under another mean/std is
caught by inverting the normalisation (pixels must come back as integers in 0..255). Texts: the
student sees `input_ids * attention_mask` (to_onnx's serving wrapper), which is `prepare`'s
token ids when the bundle's tokenizer is the run's (the exported tokenizer.json is the run's).

Targets: `log(teacher_probs)` as the teacher's logits (equal up to a per-row constant, which
softmax, at any temperature, ignores); a probability of 0 (float32 softmax underflow, a logit
gap beyond ~87) is floored at float32's smallest normal number. Hard labels (accuracy
bookkeeping, and the losses' label terms): the teacher's argmax.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import capture as shard_format
from ..bundle import ImagePreprocess, TextPreprocess
from .methods import params_for

if TYPE_CHECKING:
    from .stages.prepare import Prepared

log = logging.getLogger(__name__)

STATE = "capture.json"
HOLDOUT = "capture_holdout.npz"
FLOOR = float(np.finfo(np.float32).tiny)
# Methods whose targets are the teacher's logits on the training items; the rest cannot learn
# from soft-labelled extra items (why, by name).
REFUSED = {
    "ce": "ce trains on hard labels only, not on the teacher's probabilities",
}
_PIXEL_TOLERANCE = 0.02  # of one grey level, after inverting the normalisation


@dataclass(frozen=True)
class Captured:
    """Captured items in the training tensor space, with the teacher's probabilities."""

    x: np.ndarray  # float32 (n, C, H, W) normalised images, or int64 (n, L) token ids
    probs: np.ndarray  # float32 (n, classes)
    source: np.ndarray  # uint8 (n,): 0 delegated, 1 shadow sample

    def __len__(self) -> int:
        return len(self.probs)

    @property
    def labels(self) -> np.ndarray:
        return self.probs.argmax(1).astype(np.int64)

    @property
    def logits(self) -> np.ndarray:
        return teacher_logits(self.probs)

    def take(self, idx: np.ndarray) -> Captured:
        return Captured(self.x[idx], self.probs[idx], self.source[idx])


@dataclass(frozen=True)
class CaptureMix:
    """The captured items of one `distill --capture`: `train` mixed into the training split
    (`repeat` times each), `holdout` added to the calibration split."""

    train: Captured
    holdout: Captured
    repeat: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return str(self.info["fingerprint"])

    def mix(
        self, x: np.ndarray, y: np.ndarray, logits: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The training split with the captured training items appended."""
        if logits is None:
            raise ValueError("captured items are soft-labelled: this method has no teacher logits")
        reps = (self.repeat,) + (1,) * (self.train.x.ndim - 1)
        return (
            np.concatenate([x, np.tile(self.train.x, reps).astype(x.dtype)]),
            np.concatenate([y, np.tile(self.train.labels, self.repeat)]),
            np.concatenate(
                [logits, np.tile(self.train.logits, (self.repeat, 1)).astype(logits.dtype)]
            ),
        )


def teacher_logits(probs: np.ndarray) -> np.ndarray:
    """log p: the teacher's logits up to a per-row constant (softmax is shift-invariant)."""
    return np.log(np.maximum(probs.astype(np.float32), FLOOR)).astype(np.float32)


def check_method(name: str, params: dict[str, Any]) -> None:
    """Refuses a method that cannot learn from soft-labelled extra items."""
    why = REFUSED.get(name)
    if name == "md" and params_for(name, params).teacher_logits != "train":
        why = (
            "md decides easy/hard items on teacher logits it recomputes (teacher_logits="
            f"{params_for(name, params).teacher_logits}), not on the captured ones; "
            "use --param teacher_logits=train"
        )
    if why:
        raise ValueError(f"--capture cannot be used with method {name}: {why}")


def load_capture(
    directory: Path, prep: Prepared, *, holdout: float = 0.2, repeat: int = 1
) -> CaptureMix:
    """Every valid shard of the run's cascade under `directory` (`directory/<cascade>` when it
    exists), checked and split. Raises ValueError, naming the shard, for a shard of another
    cascade, modality or class list, or inputs in another tensor space."""
    cfg = prep.config
    check_method(cfg.method.name, cfg.method.params)
    if not 0.0 <= holdout < 1.0:
        raise ValueError("the capture holdout must be within [0, 1)")
    if repeat < 1:
        raise ValueError("the capture repeat must be at least 1")
    cascade = cfg.export.name
    by_name = directory / cascade
    shards = shard_format.read_capture(
        directory, cascade if by_name.is_dir() and by_name != directory else None
    )
    if not shards:
        raise ValueError(f"no valid capture shard (capture-*.npz) under {directory}")
    parts, entries = [], []
    for shard in shards:
        check_shard(shard, prep)
        parts.append(Captured(to_training_space(shard, prep), shard.teacher_probs, shard.source))
        entries.append({"file": shard.path.name, "items": len(shard), "sha256": _digest(shard)})
    items = Captured(
        np.concatenate([p.x for p in parts]),
        np.concatenate([p.probs for p in parts]),
        np.concatenate([p.source for p in parts]),
    )
    held = holdout_indices(items.source, holdout, cfg.seed)
    kept = np.setdiff1d(np.arange(len(items)), held)
    fingerprint = hashlib.sha256(
        json.dumps([entries, holdout, repeat, cfg.seed], sort_keys=True).encode()
    ).hexdigest()[:16]
    student_probs = np.concatenate([s.student_probs for s in shards])
    info = {
        "directory": str(directory),
        "fingerprint": fingerprint,
        "items": len(items),
        "train_items": len(kept),
        "holdout_items": len(held),
        "holdout": holdout,
        "repeat": repeat,
        "by_source": {
            name: int((items.source == code).sum())
            for code, name in enumerate(shard_format.SOURCES)
        },
        "live_agreement": round(float((student_probs.argmax(1) == items.labels).mean()), 4),
        "student_versions": sorted({s.meta["student_version"] for s in shards}),
        "teacher_versions": sorted({s.meta["teacher_version"] for s in shards}),
        "shards": entries,
    }
    log.info(
        "capture %s: %d items from %d shards (%d for training x%d, %d held back)",
        fingerprint, len(items), len(shards), len(kept), repeat, len(held),
    )  # fmt: skip
    return CaptureMix(items.take(kept), items.take(held), repeat, info)


def check_shard(shard: shard_format.Shard, prep: Prepared) -> None:
    meta, cfg = shard.meta, prep.config
    for what, found, expected in (
        ("cascade", meta["cascade"], cfg.export.name),
        ("modality", meta["modality"], prep.modality),
        ("classes", list(meta["classes"]), list(prep.classes)),
    ):
        if found != expected:
            raise ValueError(
                f"capture shard {shard.path}: its {what} is {found!r}, this run's is "
                f"{expected!r}; capture of another cascade cannot train this one"
            )


def to_training_space(shard: shard_format.Shard, prep: Prepared) -> np.ndarray:
    """The shard's inputs as `prepare` makes training arrays; raises for another space."""
    spec = prep.spec
    if isinstance(spec, TextPreprocess):
        ids, mask = shard.inputs["input_ids"], shard.inputs["attention_mask"]
        vocab = prep.tokenizer.get_vocab_size()
        if ids.shape[1] != spec.max_length:
            raise ValueError(
                f"capture shard {shard.path}: texts of {ids.shape[1]} tokens, this run's "
                f"max_length is {spec.max_length}"
            )
        if not np.isin(mask, (0, 1)).all() or ids.min() < 0 or ids.max() >= vocab:
            raise ValueError(
                f"capture shard {shard.path}: token ids outside this run's vocabulary "
                f"({vocab}) or a mask that is not 0/1: another tokenizer?"
            )
        return np.ascontiguousarray(ids * mask)  # what the exported student computes
    x = shard.inputs["input"]
    expected = (spec.channels, spec.height, spec.width)
    if x.shape[1:] != expected:
        raise ValueError(
            f"capture shard {shard.path}: images of shape {x.shape[1:]}, this run's are "
            f"{expected} (C, H, W)"
        )
    problem = _lattice_problem(x, spec)
    if problem:
        raise ValueError(
            f"capture shard {shard.path}: {problem}; the capture was normalised with another "
            f"mean/std than this run's ({spec.mean}, {spec.std})"
        )
    return np.ascontiguousarray(x, dtype=np.float32)


def _lattice_problem(x: np.ndarray, spec: ImagePreprocess) -> str | None:
    """normalize() maps grey level k to (k/255 - mean)/std: inverted, every value must be an
    integer within 0..255 (up to float32 rounding)."""
    mean = np.asarray(spec.mean, np.float64).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, np.float64).reshape(1, -1, 1, 1)
    levels = (x.astype(np.float64) * std + mean) * 255.0
    off = float(np.abs(levels - np.round(levels)).max())
    if levels.min() < -0.5 or levels.max() > 255.5:
        return f"pixels invert to levels {levels.min():.1f}..{levels.max():.1f}, not 0..255"
    if off > _PIXEL_TOLERANCE:
        return f"pixels invert to non-integer grey levels (off by up to {off:.3f})"
    return None


def holdout_indices(source: np.ndarray, share: float, seed: int) -> np.ndarray:
    """A share of each source (delegated, shadow), drawn by seed: sorted item indices."""
    rng = np.random.default_rng(seed)
    held = [
        rng.permutation(idx)[: round(share * len(idx))]
        for code in range(len(shard_format.SOURCES))
        if len(idx := np.flatnonzero(source == code))
    ]
    return np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)


def _digest(shard: shard_format.Shard) -> str:
    """Of the shard's contents, as read (not of the file: a zip's metadata is no data)."""
    h = hashlib.sha256(json.dumps(shard.meta, sort_keys=True).encode())
    for name in sorted(shard.inputs):
        h.update(name.encode() + np.ascontiguousarray(shard.inputs[name]).tobytes())
    for array in (shard.teacher_probs, shard.student_probs, shard.margins, shard.source):
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:16]


# The run directory's record of the capture, for the stages run after `distill`.


def save_state(run_dir: Path, mix: CaptureMix) -> None:
    held = mix.holdout
    np.savez(run_dir / HOLDOUT, x=held.x, probs=held.probs, source=held.source)
    (run_dir / STATE).write_text(json.dumps(mix.info, indent=2) + "\n")


def clear_state(run_dir: Path) -> None:
    """A student distilled without capture: the last capture no longer applies."""
    for name in (STATE, HOLDOUT):
        (run_dir / name).unlink(missing_ok=True)


def load_info(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / STATE
    return json.loads(path.read_text()) if path.is_file() else None


def load_holdout(run_dir: Path) -> Captured | None:
    path = run_dir / HOLDOUT
    if not path.is_file() or not (run_dir / STATE).is_file():
        return None
    with np.load(path, allow_pickle=False) as f:
        return Captured(f["x"], f["probs"], f["source"])


def summary(info: dict[str, Any]) -> dict[str, Any]:
    """For the bundle's manifest: counts and fingerprint, the shards by count (the full list
    is in the run's record.json)."""
    return {**{k: v for k, v in info.items() if k != "shards"}, "shards": len(info["shards"])}


def versioned(version: str, info: dict[str, Any] | None) -> str:
    """A bundle version that names its capture: never a version the capture was made under."""
    if not info:
        return version
    new = f"{version}-c{info['fingerprint'][:8]}"
    if new in info.get("student_versions", ()):
        raise ValueError(f"version {new} is the one the capture was made under: set another")
    return new
