"""The tiers of an N-stage cascade that run in the gateway: models between the student and the
teacher (a mid-sized model, or the later members of a B-DISTIL anytime ensemble), each an ONNX
Runtime session of the student's version.

The chain is one call per tier per micro-batch, on exactly the rows every stage before it was
unsure about: an item the student is sure of never pays for a tier, and one the first tier is
sure of never pays for the second. A tier writes its probabilities into the rows it ran on (the
answer, unless a later stage answers them), and passes on the rows whose margin is below its
own threshold. What is left unsure after the last tier is the teacher's to take (routing.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..bundle import Bundle, TierRef
from ..config.student import StudentConfig
from ..policy import decide
from .student import OnnxStudent, Student


class LocalTier:
    """One onnx tier: its session, its inputs by name, and its width checked at setup."""

    def __init__(
        self,
        bundle: Bundle,
        ref: TierRef,
        config: StudentConfig,
        n_classes: int,
        session: Student | None = None,
    ) -> None:
        self.ref = ref
        self.name = ref.name
        self.n_classes = n_classes
        self.image = bundle.manifest.modality == "image"
        self.session: Student = session or OnnxStudent(
            bundle.tier_path(ref), ref.output, device=config.device, threads=config.threads
        )

    def feeds(self, tensors: dict[str, np.ndarray], prev: np.ndarray) -> dict[str, np.ndarray]:
        out = {self.ref.input_name: tensors["input"]} if self.image else dict(tensors)
        if self.ref.prev_input is not None:
            out[self.ref.prev_input] = np.ascontiguousarray(prev, dtype=np.float32)
        return out

    def setup(self, tensors: dict[str, np.ndarray], prev: np.ndarray) -> None:
        """Loads the session and checks it answers one row of the cascade's classes."""
        self.session.setup()
        logits = self.session.predict(self.feeds(tensors, prev))
        if logits.shape != (len(prev), self.n_classes):
            raise ValueError(
                f"tier {self.name} answers shape {logits.shape} for {len(prev)} input(s); "
                f"expected ({len(prev)}, {self.n_classes})"
            )

    def close(self) -> None:
        self.session.close()


@dataclass
class ChainResult:
    stage: np.ndarray  # (n,) int8: the stage whose probabilities the row holds (0: student)
    unsure: np.ndarray  # (n,) bool: still unsure after the last tier (the teacher's to take)
    margins: np.ndarray  # (n,) the margin of the last stage that ran on each row
    ran: list[int]  # rows per tier
    seconds: list[float]  # per tier call (0 where it ran on nothing)


class TierChain:
    """The version's tiers in order."""

    def __init__(self, tiers: list[LocalTier]) -> None:
        self.tiers = tiers
        self.names = tuple(t.name for t in tiers)
        self.costs = tuple(t.ref.cost for t in tiers)

    def __len__(self) -> int:
        return len(self.tiers)

    def setup(self, tensors: dict[str, np.ndarray], student_logits: np.ndarray) -> None:
        prev = student_logits
        for tier in self.tiers:
            tier.setup(tensors, prev)
            prev = tier.session.predict(tier.feeds(tensors, prev))

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()

    def run(
        self,
        tensors: dict[str, np.ndarray],
        student_logits: np.ndarray,
        margins: np.ndarray,
        unsure: np.ndarray,
        probs: np.ndarray,
        thresholds: tuple[float, ...],
    ) -> ChainResult:
        """Runs each tier on the rows left unsure before it; writes its probabilities into
        `probs` (the batch's answer rows, over the cascade's classes)."""
        n = len(margins)
        stage = np.zeros(n, dtype=np.int8)
        margins = margins.copy()
        unsure = unsure.copy()
        ran, seconds = [], []
        rows = np.flatnonzero(unsure)
        prev = student_logits[rows]
        for k, (tier, threshold) in enumerate(zip(self.tiers, thresholds, strict=True), 1):
            if not rows.size:
                ran.append(0)
                seconds.append(0.0)
                continue
            t0 = time.perf_counter()
            taken = {name: v[rows] for name, v in tensors.items()}
            logits = tier.session.predict(tier.feeds(taken, prev))
            seconds.append(time.perf_counter() - t0)
            ran.append(int(rows.size))
            decision = decide(logits, threshold)
            probs[rows] = decision.probs
            stage[rows] = k
            margins[rows] = decision.margins
            unsure[rows] = decision.delegate
            keep = decision.delegate
            rows, prev = rows[keep], np.asarray(logits)[keep]
        return ChainResult(stage, unsure, margins, ran, seconds)
