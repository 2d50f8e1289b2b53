"""The cascade bundle: what `cascade-train export` writes and the gateway reads.

One directory per student version: `student.onnx` and `manifest.json`. The manifest is the
contract between training and serving, so it lives here (no torch) and both sides import it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImagePreprocess(_Strict):
    """How any uploaded image becomes the student's input tensor (NCHW float32)."""

    kind: Literal["image"] = "image"
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: Literal[1, 3]
    # Per channel, applied to pixel / 255.
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # Transparent pixels are composited onto this grey level (0 black .. 255 white).
    background: int = Field(default=0, ge=0, le=255)
    resample: Literal["nearest", "box", "bilinear", "bicubic", "lanczos"] = "bilinear"

    @model_validator(mode="after")
    def _per_channel(self) -> ImagePreprocess:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("std must be positive")
        return self


class TextPreprocess(_Strict):
    """How a text becomes the student's input: the bundle's `tokenizer.json` (Hugging Face
    tokenizers; its normaliser is recorded here too), truncated and padded to `max_length`.
    Model inputs are `input_ids` and `attention_mask`, both int64 (batch, max_length)."""

    kind: Literal["text"] = "text"
    tokenizer_file: str = "tokenizer.json"
    max_length: int = Field(gt=0, le=4096)
    # What the tokenizer's normaliser does (informational; the tokenizer file is the truth).
    lowercase: bool = True
    normalization: str = "NFD, lowercase, strip accents"
    model: Literal["wordpiece", "bpe"] = "wordpiece"
    truncation: Literal["right"] = "right"
    padding: Literal["max_length"] = "max_length"
    pad_id: int = 0


TEXT_INPUTS = ("input_ids", "attention_mask")


class TeacherRef(_Strict):
    """The Triton model the student delegates to, and its tensor contract."""

    model_name: str
    model_version: str = ""  # "" = Triton's version policy picks
    input_name: str = "input"  # image teachers
    text_inputs: tuple[str, str] = TEXT_INPUTS  # text teachers: token ids, attention mask
    output_name: str = "logits"
    max_batch_size: int = Field(default=64, gt=0)


class CalibrationRow(_Strict):
    threshold: float
    delegation_rate: float
    cascade_accuracy: float
    expected_cost: float
    # What the student answers alone at this threshold (bundles from before these fields
    # have None: max_student_error and the live-accuracy interval need them).
    accepted: int | None = None  # items
    accepted_errors: int | None = None  # of those, wrong by the labels
    accepted_disagreements: int | None = None  # of those, answered otherwise by the teacher


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided interval for a binomial proportion k/n (each tail (1-confidence)/2)."""
    from scipy.special import betaincinv  # the beta quantile

    if n <= 0:
        return 0.0, 1.0
    tail = (1.0 - confidence) / 2
    lower = 0.0 if k == 0 else float(betaincinv(k, n - k + 1, tail))
    upper = 1.0 if k == n else float(betaincinv(k + 1, n - k, 1 - tail))
    return lower, upper


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """One-sided upper bound: the proportion is below it with `confidence`."""
    from scipy.special import betaincinv  # the beta quantile

    if n <= 0 or k >= n:
        return 1.0
    return float(betaincinv(k + 1, n - k, confidence))


class Calibration(_Strict):
    """Threshold table measured on a held-out split (never the training data)."""

    split: str
    n: int
    student_accuracy: float
    teacher_accuracy: float
    # Relative cost per request, teacher alone = 1.0 (from MACs).
    cost_student: float
    cost_teacher: float
    target_delegation_rate: float
    threshold: float
    # Sorted by delegation_rate, one row per percent.
    table: tuple[CalibrationRow, ...]

    def threshold_for_rate(self, rate: float) -> float:
        """Threshold whose calibration-split delegation rate is `rate` (linear interpolation)."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError("target delegation rate must be within [0, 1]")
        rates = np.array([r.delegation_rate for r in self.table])
        thresholds = np.array([r.threshold for r in self.table])
        return float(np.interp(rate, rates, thresholds))

    def threshold_for_accuracy(self, accuracy: float) -> float:
        """The lowest-delegation threshold whose cascade accuracy reaches `accuracy`."""
        for row in self.table:
            if row.cascade_accuracy >= accuracy:
                return row.threshold
        raise ValueError(
            f"no threshold reaches cascade accuracy {accuracy} on the calibration split "
            f"(best {max(r.cascade_accuracy for r in self.table):.4f})"
        )

    def _accepted_rows(self) -> list[CalibrationRow]:
        rows = [r for r in self.table if r.accepted is not None and r.accepted_errors is not None]
        if not rows:
            raise ValueError(
                "this bundle's calibration has no per-threshold error counts (exported before "
                "they were recorded): re-run cascade-train calibrate and export"
            )
        return rows

    def threshold_for_student_error(self, max_error: float, confidence: float = 0.95) -> float:
        """The lowest threshold at which the student's error on what it answers alone is within
        `max_error` with `confidence`, found by fixed-sequence testing (Learn then Test,
        Angelopoulos et al. 2021): from the highest threshold down, each row's one-sided
        Clopper-Pearson bound is tested at `1 - confidence` and the search stops at the first
        that fails. Picking the lowest passing row among all of them instead would be the best
        of a hundred tries, not a 95% bound. The sequence starts at the highest threshold that
        leaves the student enough items for the test to have power (an error rate of half the
        bound in them would pass): that depends on the margins only, not on the labels, so the
        test stays valid, and one error among the handful of items the highest thresholds
        leave does not end it. A target the student cannot reach on this split raises, naming
        the best it can do."""
        tested = []
        for row in self._accepted_rows():
            assert row.accepted is not None and row.accepted_errors is not None
            if row.accepted:  # a threshold that leaves nothing to the student tests nothing
                upper = clopper_pearson_upper(row.accepted_errors, row.accepted, confidence)
                half = math.ceil(row.accepted * max_error / 2)
                possible = clopper_pearson_upper(half, row.accepted, confidence) <= max_error
                tested.append((upper, row, possible))
        if not tested:
            raise ValueError("the calibration split has no item the student answers alone")
        chosen = None
        for upper, row, possible in sorted(tested, key=lambda t: -t[1].threshold):
            if not possible:
                continue  # too few items to test; not a hypothesis of the sequence
            if upper > max_error:
                break
            chosen = row
        if chosen is not None:
            return chosen.threshold
        # The best among the sequence's hypotheses (rows with too few items to test are not
        # ones: a handful of error-free items would name a threshold the test never judged).
        candidates = [t for t in tested if t[2]] or tested
        upper, row, _ = min(candidates, key=lambda t: t[0])
        if upper <= max_error:  # within it further down, past a threshold that is not
            raise ValueError(
                f"the student's error is within {max_error} on the calibration split only at "
                f"threshold {row.threshold:.4f}, below higher thresholds that are not (the "
                "test from the highest threshold down stops at the first that fails)"
            )
        raise ValueError(
            f"the student cannot keep its error within {max_error} (upper {confidence:.0%} "
            f"bound) on the calibration split ({self.n} items): the best it can do is "
            f"{upper:.4f}, at threshold {row.threshold:.4f} (delegation {row.delegation_rate:.2f})"
        )

    def accepted_at(self, threshold: float) -> CalibrationRow | None:
        """The table's row for the items a threshold leaves to the student alone: the first
        row at or above it (its accepted set is a subset of the threshold's), None when the
        table has no counts."""
        try:
            rows = self._accepted_rows()
        except ValueError:
            return None
        for row in rows:
            if row.threshold >= threshold:
                return row
        return rows[-1]

    def frontier(self) -> Frontier:
        """The two-stage cascade's frontier: the table's rows that no other beats on both
        accuracy and cost, by cost."""
        rows = [
            FrontierRow(
                thresholds=(r.threshold,),
                answered=(1.0 - r.delegation_rate, r.delegation_rate),
                cascade_accuracy=r.cascade_accuracy,
                expected_cost=r.expected_cost,
                # The teacher answers the rest: only the student's own answers can disagree.
                teacher_agreement=(
                    None
                    if r.accepted_disagreements is None or self.n <= 0
                    else 1.0 - r.accepted_disagreements / self.n
                ),
            )
            for r in self.table
        ]
        return Frontier(split=self.split, n=self.n, rows=tuple(pareto(rows)))

    def rate_for_threshold(self, threshold: float) -> float:
        rates = np.array([r.delegation_rate for r in self.table])
        thresholds = np.array([r.threshold for r in self.table])
        # Thresholds are non-decreasing in rate; interp needs increasing x, so dedupe.
        thresholds, idx = np.unique(thresholds, return_index=True)
        return float(np.interp(threshold, thresholds, rates[idx]))


class StudentStage(_Strict):
    """One stage of an anytime (B-DISTIL) student: an ONNX output holding the cumulative
    logits after k members, and the threshold that lets an item stop there."""

    output: str
    threshold: float = Field(ge=0.0, le=1.0)
    # Share of the items reaching this stage that move on, on the calibration split.
    pass_rate: float = Field(ge=0.0, le=1.0)


STAGE_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"
# The names of the two ends of every cascade: a tier between them cannot take either.
# Names the gateway's series use already (stages, latency stages, compute tiers): a tier so
# named would merge with them.
RESERVED_STAGES = (
    "student",
    "teacher",
    "teacher_only",
    "preprocess",
    "queue",
    "total",
    "overhead",
    "parse",
)


class TierRef(_Strict):
    """A model between the student and the teacher (an N-stage cascade): it answers only the
    items every stage before it was unsure about, and passes on those it is unsure about too.
    `onnx`: a graph in the bundle, run in the gateway with ONNX Runtime; `triton`: a model on
    the teacher's Triton, called as the teacher is (its own breaker and in-flight bounds)."""

    name: str = Field(pattern=STAGE_NAME)
    runtime: Literal["onnx", "triton"] = "onnx"
    # onnx: the graph's file, in the bundle directory itself (no path: a bundle stays one dir)
    file: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*\.onnx$")
    model: TeacherRef | None = None  # triton: the model and its tensor contract
    input_name: str = "input"  # onnx image tiers (text tiers take input_ids, attention_mask)
    output: str = "logits"
    # onnx: a graph input fed the previous stage's logits. Anytime ensembles (B-DISTIL) export
    # member k as F_k = F_{k-1} + eta_k f_k(x), so a later member costs one member, not k.
    prev_input: str | None = None
    threshold: float = Field(ge=0.0, le=1.0)
    # Relative cost of one item here (the teacher alone = 1.0, as in the calibration).
    cost: float = Field(ge=0.0)
    # Share of the items reaching this tier that move on, on the calibration split.
    pass_rate: float | None = Field(default=None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _runtime(self) -> TierRef:
        if self.name in RESERVED_STAGES:
            raise ValueError(f"a tier cannot be named {self.name!r}")
        if self.runtime == "onnx" and not self.file:
            raise ValueError(f"tier {self.name}: an onnx tier needs its file")
        if self.runtime == "triton" and (self.model is None or self.prev_input is not None):
            raise ValueError(f"tier {self.name}: a triton tier needs its model and no prev_input")
        return self


class FrontierRow(_Strict):
    """One setting of every threshold of an N-stage cascade, measured on the calibration split:
    `thresholds[k]` for stage k (the student first, the teacher takes what the last leaves)."""

    thresholds: tuple[float, ...]
    # Share of all items answered by each stage, the teacher last (sums to 1).
    answered: tuple[float, ...]
    cascade_accuracy: float
    expected_cost: float  # per item, the teacher alone = 1.0
    # Share of all items answered as the teacher answers them (the teacher's own count): what
    # the gateway sees live (shadow samples), so a target accuracy is held in these terms.
    # None in frontiers calibrated before it.
    teacher_agreement: float | None = Field(default=None, ge=0.0, le=1.0)

    @property
    def teacher_rate(self) -> float:
        return self.answered[-1]


def pareto(rows: list[FrontierRow]) -> list[FrontierRow]:
    """The rows no other beats (at least as accurate at no more cost), by cost: accuracy
    rises strictly along them."""
    out: list[FrontierRow] = []
    for row in sorted(rows, key=lambda r: (r.expected_cost, -r.cascade_accuracy)):
        if not out or row.cascade_accuracy > out[-1].cascade_accuracy:
            out.append(row)
    return out


class Frontier(_Strict):
    """The accuracy-vs-cost frontier of an N-stage cascade: the threshold settings no other
    setting beats on both (higher accuracy at no higher cost), sorted by cost."""

    split: str
    n: int
    rows: tuple[FrontierRow, ...] = Field(min_length=1)

    def for_accuracy(self, accuracy: float) -> FrontierRow:
        """The cheapest setting whose cascade accuracy reaches `accuracy`."""
        for row in self.rows:
            if row.cascade_accuracy >= accuracy:
                return row
        raise ValueError(
            f"no setting reaches cascade accuracy {accuracy} on the calibration split "
            f"(best {self.rows[-1].cascade_accuracy:.4f})"
        )

    def for_cost(self, budget: float) -> FrontierRow:
        """The most accurate setting whose expected cost is within `budget`."""
        within = [r for r in self.rows if r.expected_cost <= budget]
        if not within:
            raise ValueError(
                f"no setting costs {budget} or less per item on the calibration split "
                f"(cheapest {self.rows[0].expected_cost:.4f})"
            )
        return within[-1]


class Manifest(_Strict):
    format_version: int = FORMAT_VERSION
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")
    version: str
    modality: Literal["image", "text"]
    classes: tuple[str, ...]
    student_file: str = "student.onnx"
    # The image tensor's name (text students take input_ids and attention_mask).
    student_input: str = "input"
    student_output: str = "logits"
    preprocess: ImagePreprocess | TextPreprocess = Field(discriminator="kind")
    # Class id of each student output, -1 for an abstain output (CD-III); None: output i is
    # class i. Teachers always output every class.
    output_classes: tuple[int, ...] | None = None
    abstain_output: int | None = None
    # Class-based delegation: the student's argmax outside these classes is delegated.
    in_domain_classes: tuple[int, ...] | None = None
    # Anytime students (B-DISTIL): cumulative stages, each with its own threshold. The
    # gateway serves `student_output` (the last stage) with `default_threshold` today.
    stages: tuple[StudentStage, ...] = ()
    default_threshold: float = Field(ge=0.0, le=1.0)
    calibration: Calibration
    teacher: TeacherRef
    # N-stage cascades: the models between the student and the teacher, in order (empty: the
    # two-stage cascade). `frontier`: every threshold calibrated at once (calibrate.py).
    tiers: tuple[TierRef, ...] = ()
    frontier: Frontier | None = None
    training: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _classes(self) -> Manifest:
        if self.preprocess.kind != self.modality:
            raise ValueError(f"a {self.modality} cascade needs {self.modality} preprocessing")
        n = len(self.classes)
        if n < 2:
            raise ValueError("a classifier needs at least 2 classes")
        if self.output_classes is not None:
            if any(c < -1 or c >= n for c in self.output_classes):
                raise ValueError(f"output_classes must be class ids in [0, {n}) or -1")
            if self.abstain_output is not None and self.output_classes[self.abstain_output] != -1:
                raise ValueError("abstain_output must map to -1 in output_classes")
        elif self.abstain_output is not None:
            raise ValueError("an abstain output needs output_classes")
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError("tier names must be unique")
        if self.frontier is not None and any(
            len(r.thresholds) != len(self.tiers) + 1 or len(r.answered) != len(self.tiers) + 2
            for r in self.frontier.rows
        ):
            raise ValueError("frontier rows need a threshold per stage but the teacher")
        if self.in_domain_classes is not None and any(
            not 0 <= c < n for c in self.in_domain_classes
        ):
            raise ValueError("in_domain_classes must be class ids")
        return self

    @property
    def student_outputs(self) -> int:
        return len(self.output_classes) if self.output_classes is not None else len(self.classes)

    def in_domain_outputs(self) -> np.ndarray | None:
        """Bool mask over student outputs for class-based delegation, or None."""
        from .policy import in_domain_mask

        return in_domain_mask(self.in_domain_classes, self.output_classes, len(self.classes))

    def policy(self) -> dict:
        """Keyword arguments of `policy.decide` for this student."""
        return {
            "abstain_output": self.abstain_output,
            "in_domain_outputs": self.in_domain_outputs(),
        }


class Bundle:
    """A loaded bundle directory."""

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest

    @property
    def student_path(self) -> Path:
        return self.path / self.manifest.student_file

    def tier_path(self, tier: TierRef) -> Path:
        assert tier.file is not None
        return self.path / tier.file

    @property
    def stage_names(self) -> tuple[str, ...]:
        """The stages in order, as answers and metrics name them."""
        return ("student", *(t.name for t in self.manifest.tiers), "teacher")

    @classmethod
    def load(cls, path: str | Path) -> Bundle:
        path = Path(path)
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no {MANIFEST_FILE} in bundle directory {path}")
        manifest = Manifest.model_validate_json(manifest_path.read_bytes())
        if manifest.format_version != FORMAT_VERSION:
            raise ValueError(
                f"{manifest_path}: format_version {manifest.format_version}, "
                f"this gateway reads {FORMAT_VERSION}"
            )
        bundle = cls(path, manifest)
        if not bundle.student_path.is_file():
            raise FileNotFoundError(
                f"bundle {path} names {manifest.student_file}, which is missing"
            )
        for tier in manifest.tiers:
            if tier.runtime == "onnx" and not bundle.tier_path(tier).is_file():
                raise FileNotFoundError(
                    f"bundle {path}: tier {tier.name} names {tier.file}, which is missing"
                )
        return bundle

    def save(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / (MANIFEST_FILE + ".tmp")
        # A two-stage bundle is written without the N-stage fields, as before they existed:
        # gateways of earlier versions (a rollback) still load it.
        m = self.manifest
        exclude = {k for k in ("tiers", "frontier") if not getattr(m, k)}
        tmp.write_text(m.model_dump_json(indent=2, exclude=exclude) + "\n")
        tmp.replace(self.path / MANIFEST_FILE)
