"""A worker's sliding window of live traffic, per cascade: a mergeable quantile sketch of the
student's margins (DDSketch), how many items the policy delegated, and the shadow tallies per
margin stratum. Workers publish their window through the control store and the controller
merges every live worker's (and replica's).

The request path only appends arrays (`observe_*`); folding them into sketches and rotating
buckets happens in `roll`, once per controller interval. Buckets close after `bucket_items`
items or `bucket_s` seconds (checked once per roll); the window keeps the newest buckets that
together hold `window_items` items, at most `buckets` of them and none older than `window_s`,
so it covers about the last `window_items` items at high traffic and the last `window_s`
seconds at low traffic.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field

import numpy as np
import orjson
from ddsketch import DDSketch
from ddsketch.pb.ddsketch_pb2 import DDSketch as SketchMessage
from ddsketch.pb.proto import DDSketchProto

from ..config.delegation import ControllerConfig

# Margins are rounded to 1e-3 before they are counted into the sketch, so that one update
# covers every equal value of a batch and a roll costs at most ~1,000 updates (the sketch is
# 0.5% accurate: about 0.005 at a margin of 0.9; the rounding adds at most 0.0005).


def new_sketch(relative_accuracy: float) -> DDSketch:
    return DDSketch(relative_accuracy)


def add_margins(sketch: DDSketch, margins: np.ndarray) -> None:
    values, counts = np.unique(np.round(margins, 3), return_counts=True)
    for value, count in zip(values.tolist(), counts.tolist(), strict=True):
        sketch.add(max(value, 0.0), float(count))


def strata_of(margins: np.ndarray, strata: int) -> np.ndarray:
    return np.minimum((np.asarray(margins) * strata).astype(np.int64), strata - 1)


@dataclass
class Summary:
    """A window (one worker's, or several merged): what the controller and the estimates use."""

    sketch: DDSketch
    items: float = 0.0  # items routed by the policy (not forced by a request)
    delegated: float = 0.0  # of those, delegated
    # Of those, delegated whatever the threshold (by class, non-finite): not in the sketch.
    forced: float = 0.0
    teacher_answered: float = 0.0  # items the teacher answered (all routes)
    student_answered: float = 0.0  # items the student answered (all routes)
    answered: np.ndarray = field(default_factory=lambda: np.zeros(0))  # student answers/stratum
    shadowed: np.ndarray = field(default_factory=lambda: np.zeros(0))
    disagreed: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # Items answered by each stage (the student, the tiers, the teacher): the live cost.
    stages: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # Shadow samples of each stage's answers and, of those, the ones the teacher answered
    # otherwise (the tiers' live agreement; the student's is by stratum above).
    stage_shadowed: np.ndarray = field(default_factory=lambda: np.zeros(0))
    stage_disagreed: np.ndarray = field(default_factory=lambda: np.zeros(0))
    workers: int = 1
    version: str = ""  # the student version observed ("" when merged or unknown)
    # The frontier row its per-stage counts and tallies were counted on ("" outside the
    # frontier modes): around a move, another worker's window may still be the old row's.
    row: str = ""
    # The shadow tallies (and the answers they weigh) over the longer evidence horizon
    # (ControllerConfig.evidence_items): what a threshold comes back on. None: not kept.
    evidence: Evidence | None = None

    @classmethod
    def empty(cls, relative_accuracy: float, strata: int) -> Summary:
        z = np.zeros(strata)
        return cls(
            new_sketch(relative_accuracy),
            answered=z,
            shadowed=z.copy(),
            disagreed=z.copy(),
            workers=0,
        )

    def merge(self, other: Summary) -> None:
        self.sketch.merge(other.sketch)
        self.items += other.items
        self.delegated += other.delegated
        self.forced += other.forced
        self.teacher_answered += other.teacher_answered
        self.student_answered += other.student_answered
        self.answered = self.answered + other.answered
        self.shadowed = self.shadowed + other.shadowed
        self.disagreed = self.disagreed + other.disagreed
        self.stages = _add(self.stages, other.stages)
        self.stage_shadowed = _add(self.stage_shadowed, other.stage_shadowed)
        self.stage_disagreed = _add(self.stage_disagreed, other.stage_disagreed)
        self.workers += other.workers
        if other.evidence is not None:
            if self.evidence is None:
                self.evidence = Evidence.empty(len(self.answered))
            self.evidence.merge(other.evidence)

    @property
    def delegation_rate(self) -> float | None:
        return self.delegated / self.items if self.items else None

    @property
    def forced_rate(self) -> float:
        return self.forced / self.items if self.items else 0.0

    def quantile(self, q: float) -> float | None:
        if self.sketch.count == 0:
            return None
        value = self.sketch.get_quantile_value(q)
        return None if value is None else float(min(max(value, 0.0), 1.0))

    def to_bytes(self) -> bytes:
        proto = DDSketchProto.to_proto(self.sketch).SerializeToString()  # type: ignore[no-untyped-call]
        return orjson.dumps(
            {
                "sketch": base64.b64encode(proto).decode(),
                "items": self.items,
                "delegated": self.delegated,
                "forced": self.forced,
                "version": self.version,
                "teacher_answered": self.teacher_answered,
                "student_answered": self.student_answered,
                "answered": self.answered.tolist(),
                "shadowed": self.shadowed.tolist(),
                "disagreed": self.disagreed.tolist(),
                "stages": self.stages.tolist(),
                "stage_shadowed": self.stage_shadowed.tolist(),
                "stage_disagreed": self.stage_disagreed.tolist(),
                "evidence": None if self.evidence is None else self.evidence.to_dict(),
                "row": self.row,
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes, relative_accuracy: float, strata: int) -> Summary:
        data = orjson.loads(raw)
        proto = SketchMessage.FromString(base64.b64decode(data["sketch"]))
        sketch = new_sketch(relative_accuracy)
        # The same mapping on both sides (the same relative accuracy): mergeable.
        sketch.merge(DDSketchProto.from_proto(proto))  # type: ignore[no-untyped-call]

        def counts(key: str) -> np.ndarray:
            values = np.asarray(data[key], float)
            return values if values.shape == (strata,) else np.zeros(strata)

        evidence = data.get("evidence")
        return cls(
            sketch,
            float(data["items"]),
            float(data["delegated"]),
            float(data.get("forced", 0.0)),
            float(data.get("teacher_answered", 0.0)),
            float(data.get("student_answered", 0.0)),
            counts("answered"),
            counts("shadowed"),
            counts("disagreed"),
            np.asarray(data.get("stages", []), float).ravel(),
            np.asarray(data.get("stage_shadowed", []), float).ravel(),
            np.asarray(data.get("stage_disagreed", []), float).ravel(),
            version=str(data.get("version", "")),
            evidence=None if evidence is None else Evidence.from_dict(evidence, strata),
            row=str(data.get("row", "")),
        )

    def drop_stages(self) -> None:
        """Without its per-stage counts and tallies: they are another frontier row's."""
        self.stages = self.stage_shadowed = self.stage_disagreed = np.zeros(0)
        if self.evidence is not None:
            self.evidence.stage_shadowed = self.evidence.stage_disagreed = np.zeros(0)


@dataclass
class Evidence:
    """Shadow tallies over the evidence horizon: the student's by margin stratum (with its
    answers there, which weigh them), each stage's."""

    answered: np.ndarray
    shadowed: np.ndarray
    disagreed: np.ndarray
    stage_shadowed: np.ndarray = field(default_factory=lambda: np.zeros(0))
    stage_disagreed: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @classmethod
    def empty(cls, strata: int) -> Evidence:
        return cls(np.zeros(strata), np.zeros(strata), np.zeros(strata))

    def merge(self, other: Summary | Evidence) -> None:
        self.answered = self.answered + other.answered
        self.shadowed = self.shadowed + other.shadowed
        self.disagreed = self.disagreed + other.disagreed
        self.stage_shadowed = _add(self.stage_shadowed, other.stage_shadowed)
        self.stage_disagreed = _add(self.stage_disagreed, other.stage_disagreed)

    def to_dict(self) -> dict[str, list[float]]:
        return {k: getattr(self, k).tolist() for k in _EVIDENCE}

    @classmethod
    def from_dict(cls, data: object, strata: int) -> Evidence:
        if not isinstance(data, dict):
            raise ValueError("evidence is not an object")

        def counts(key: str) -> np.ndarray:
            values = np.asarray(data.get(key, []), float).ravel()
            return values if values.shape == (strata,) else np.zeros(strata)

        stages = (np.asarray(data.get(k, []), float).ravel() for k in _EVIDENCE[3:])
        return cls(counts("answered"), counts("shadowed"), counts("disagreed"), *stages)


_EVIDENCE = ("answered", "shadowed", "disagreed", "stage_shadowed", "stage_disagreed")


_MAX_BUCKETS = 2_000  # kept for the evidence horizon, at most


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-stage counts added; a window of another stage count (another version's, which the
    merge leaves out anyway) is not mixed in."""
    if not b.size:
        return a
    if not a.size:
        return np.asarray(b, float).copy()
    return a + b if a.shape == b.shape else a


@dataclass
class _Bucket:
    opened: float
    summary: Summary


class Window:
    def __init__(self, config: ControllerConfig, strata: int) -> None:
        self.config = config
        self.strata = strata
        # Margins are sketched only while a policy needs their quantiles (a target delegation
        # rate), and student answers counted by stratum only while shadow samples are taken:
        # the plain counts serve a fixed threshold, at a fraction of the cost.
        self.sketching = False
        self.stratified = False
        # Answers counted per stage only while a cost budget is held (the live cost).
        self.counting = False
        self.bucket_items = max(config.window_items // config.buckets, 1)
        self.bucket_s = config.window_s / config.buckets
        self.version = ""
        self.row = ""  # the frontier row counted on (set by the controller)
        self.stage_count = 2
        self._buckets: list[_Bucket] = []
        self._pending_margins: list[np.ndarray] = []
        self._pending = self._empty()

    def _empty(self) -> Summary:
        summary = Summary.empty(self.config.relative_accuracy, self.strata)
        summary.workers = 1
        return summary

    def reset(self, version: str, stages: int = 2) -> None:
        """A new student version: what the old one was seen doing says nothing of it.
        `stages`: how many answer (the student, its tiers, the teacher)."""
        self.version = version
        self.row = ""
        self.stage_count = stages
        self._buckets = []
        self._pending_margins = []
        self._pending = self._empty()

    # The request path: appends only.
    def routed(self, margins: np.ndarray, delegated: int, forced: int = 0) -> None:
        """Items the policy routed (not forced by a request): the margins of those the
        threshold decides, how many of all were delegated, and how many of those were
        delegated whatever the threshold (`forced`, not in `margins`)."""
        if self.sketching:
            self._pending_margins.append(margins)
        self._pending.items += len(margins) + forced
        self._pending.delegated += delegated
        self._pending.forced += forced

    def answered(self, student_margins: np.ndarray, teacher_items: int) -> None:
        """Answers given: the student's by margin stratum, and how many the teacher gave."""
        self._pending.student_answered += len(student_margins)
        if self.stratified and len(student_margins):
            self._pending.answered = self._pending.answered + np.bincount(
                strata_of(student_margins, self.strata), minlength=self.strata
            )
        self._pending.teacher_answered += teacher_items

    def answered_by(self, counts: np.ndarray) -> None:
        """Items answered, per stage (indexes the version's stage names). Counts of another
        stage count (the old version's calls settling after a swap) are not this version's."""
        if self.counting and len(counts) == self.stage_count:
            self._pending.stages = _add(self._pending.stages, counts)

    def clear_stages(self) -> None:
        """Forgets the per-stage counts and tallies: the stages' thresholds changed (the
        controller moved along the frontier), and what the old row's traffic cost, or how
        often its tiers agreed with the teacher, says nothing of the new one. (The student's
        tallies by margin stratum stay: a stratum's agreement does not depend on the
        threshold.)"""
        for summary in [*(b.summary for b in self._buckets), self._pending]:
            summary.drop_stages()

    def shadowed(
        self, margins: np.ndarray, agrees: np.ndarray, stages: np.ndarray | None = None
    ) -> None:
        """Shadow samples answered: the student's margin and the stage that answered each
        (None: the student), and whether the teacher agreed. The student's are tallied by
        margin stratum; every stage's, while answers are counted per stage."""
        if stages is not None and len(stages):
            if self.counting and stages.max() < self.stage_count:
                p = self._pending
                p.stage_shadowed = _add(
                    p.stage_shadowed, np.bincount(stages, minlength=self.stage_count)
                )
                p.stage_disagreed = _add(
                    p.stage_disagreed,
                    np.bincount(
                        stages, weights=(~agrees).astype(float), minlength=self.stage_count
                    ),
                )
            own = stages == 0
            margins, agrees = margins[own], agrees[own]
        idx = strata_of(margins, self.strata)
        self._pending.shadowed = self._pending.shadowed + np.bincount(idx, minlength=self.strata)
        self._pending.disagreed = self._pending.disagreed + np.bincount(
            idx, weights=(~agrees).astype(float), minlength=self.strata
        )

    # Once per interval.
    def roll(self, now: float | None = None) -> Summary:
        """Folds what was observed into the open bucket, rotates, and returns the window."""
        now = time.monotonic() if now is None else now
        pending, self._pending = self._pending, self._empty()
        margins, self._pending_margins = self._pending_margins, []
        if margins and self.sketching:
            add_margins(pending.sketch, np.concatenate(margins))
        if not self._buckets or self._full(self._buckets[-1], now):
            self._buckets.append(
                _Bucket(now, Summary.empty(self.config.relative_accuracy, self.strata))
            )
        self._buckets[-1].summary.merge(pending)
        config = self.config
        window = Summary.empty(config.relative_accuracy, self.strata)
        short = self._newest(config.window_items, config.window_s, config.buckets, now)
        for bucket in short:
            window.merge(bucket.summary)
        if not self.stratified:
            self._buckets = short
        else:  # shadow samples taken: older buckets kept for the evidence
            self._buckets = self._newest(
                max(config.evidence_items, config.window_items),
                max(config.evidence_s, config.window_s),
                _MAX_BUCKETS,
                now,
            )
            window.evidence = Evidence.empty(self.strata)
            for bucket in self._buckets:
                window.evidence.merge(bucket.summary)
        window.workers = 1
        window.version = self.version
        window.row = self.row
        return window

    def _newest(self, items: int, seconds: float, limit: int, now: float) -> list[_Bucket]:
        """The newest buckets (at most `limit`) that together hold `items` items (at least
        one bucket), none opened more than `seconds` ago: a bucket fills per roll, so at high
        traffic one bucket can hold a whole second's items and counting buckets alone would
        stretch the window."""
        horizon = now - seconds
        kept: list[_Bucket] = []
        held = 0.0
        for bucket in reversed(self._buckets[-limit:]):
            if bucket.opened < horizon or (kept and held >= items):
                break
            kept.append(bucket)
            held += bucket.summary.items
        return kept[::-1]

    def _full(self, bucket: _Bucket, now: float) -> bool:
        return bucket.summary.items >= self.bucket_items or now - bucket.opened >= self.bucket_s
