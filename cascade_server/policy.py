"""The delegation decision, in exactly one place: a pure function of the student's logits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class NonFiniteLogits(ValueError):
    """The student produced NaN or inf; its probabilities mean nothing."""


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of a (batch, classes) array; rejects non-finite logits."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"expected (batch, classes>=2) logits, got shape {logits.shape}")
    if not np.isfinite(logits).all():
        raise NonFiniteLogits("logits contain NaN or inf")
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    out: np.ndarray = exp / exp.sum(axis=1, keepdims=True)
    return out


def top2_margin(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability per row; 0 on a tie, in [0, 1]."""
    top2 = np.partition(probs, -2, axis=1)[:, -2:]
    margins: np.ndarray = top2[:, 1] - top2[:, 0]
    return margins


@dataclass(frozen=True)
class Decision:
    probs: np.ndarray  # (batch, classes) float64; rows of non-finite logits are uniform
    margins: np.ndarray  # (batch,); 0 where logits were non-finite
    delegate: np.ndarray  # (batch,) bool
    non_finite: np.ndarray  # (batch,) bool
    # (batch,) bool: delegated whatever the threshold (non-finite logits, class-based
    # delegation); what a target delegation rate cannot move.
    forced: np.ndarray


def decide(
    logits: np.ndarray,
    threshold: float | np.ndarray,
    *,
    abstain_output: int | None = None,
    in_domain_outputs: np.ndarray | None = None,
) -> Decision:
    """Delegate iff margin < threshold (a number, or one per row), or (class-based delegation)
    the student's argmax is
    the abstain output or an output outside the in-domain set (`in_domain_outputs`, a bool
    mask over outputs). A row with non-finite logits is always delegated: the student has no
    answer to give, and the teacher may."""
    logits = np.asarray(logits, dtype=np.float64)
    bad = ~np.isfinite(logits).all(axis=1)
    safe = np.where(bad[:, None], 0.0, logits)
    probs = softmax(safe)
    margins = np.where(bad, 0.0, top2_margin(probs))
    forced = bad
    if abstain_output is not None or in_domain_outputs is not None:
        forced = bad.copy()
        top = probs.argmax(axis=1)
        if abstain_output is not None:
            forced |= top == abstain_output
        if in_domain_outputs is not None:
            forced |= ~np.asarray(in_domain_outputs, dtype=bool)[top]
    delegate = (margins < threshold) | forced
    return Decision(probs=probs, margins=margins, delegate=delegate, non_finite=bad, forced=forced)


def class_probabilities(
    probs: np.ndarray, output_classes: tuple[int, ...] | None, num_classes: int
) -> np.ndarray:
    """Student output probabilities -> probabilities over the cascade's classes. Outputs
    mapped to -1 (abstain) are dropped and the rest renormalised; classes the student has no
    output for get 0."""
    if output_classes is None:
        return probs
    out = np.zeros((len(probs), num_classes), dtype=probs.dtype)
    for j, c in enumerate(output_classes):
        if c >= 0:
            out[:, c] += probs[:, j]
    total = out.sum(axis=1, keepdims=True)
    return np.where(total > 0, out / np.where(total > 0, total, 1.0), 1.0 / num_classes)


def in_domain_mask(
    in_domain_classes: Sequence[int] | None,
    output_classes: Sequence[int] | None,
    num_classes: int,
) -> np.ndarray | None:
    """Bool mask over the student's outputs for class-based delegation: True where the output
    is a class in the in-domain set. None when the student has no in-domain set."""
    if in_domain_classes is None:
        return None
    keep = set(in_domain_classes)
    mapping = output_classes if output_classes is not None else range(num_classes)
    return np.array([c in keep for c in mapping], dtype=bool)
