"""What the batch path keeps and reuses: rows the response cache holds (the student's logits,
the teacher's probabilities, by input digest and model version) and the teacher's answers
sampled into the capture. Both off by default; neither ever fails or delays an answer (the
cache is in memory; the capture only queues, its writer thread does the I/O)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..preprocess import Batch
from .answers import Answer
from .cache import ResponseCache, digests
from .capture import Capture
from .routing import Routes
from .version import StudentVersion


@dataclass(frozen=True)
class Kept:
    """What a teacher call's answers are kept with: the sent rows' inputs, the cascade's
    answer for them before the teacher's (capture), and their cache keys."""

    tensors: dict[str, np.ndarray]
    student_probs: np.ndarray | None
    keys: list[bytes] | None


class Keeper:
    def __init__(self, cache: ResponseCache | None, capture: Capture | None) -> None:
        self.cache = cache if cache is not None and cache.config.enabled else None
        self.capture = capture if capture is not None and capture.enabled else None

    def keys(self, batch: Batch) -> list[bytes] | None:
        """The batch's input digests, when the cache is on."""
        return digests(batch.tensors) if self.cache is not None else None

    def kept(
        self,
        taken: dict[str, np.ndarray],
        answer: Answer,
        sent: np.ndarray,
        keys: list[bytes] | None,
    ) -> Kept:
        return Kept(
            taken,
            answer.probs[sent] if self.capture is not None else None,
            None if keys is None else [keys[i] for i in sent],
        )

    def student(
        self, version: StudentVersion, batch: Batch, keys: list[bytes] | None
    ) -> np.ndarray:
        """The student's logits; with the response cache, only the rows it does not hold run
        (a lone request whose inputs are all held runs no model)."""
        if keys is None or self.cache is None or not self.cache.enabled_for("student"):
            return version.student.predict(version.feeds(batch))
        hits, rows = self.cache.get_many("student", version.version, keys)
        if rows is None:
            logits = version.student.predict(version.feeds(batch))
            self.cache.put_many("student", version.version, keys, logits)
            return logits
        if hits.all():
            return np.array(rows)
        miss = np.flatnonzero(~hits)
        computed = version.student.predict(version.feeds(Batch(batch.take(miss), None)))
        self.cache.put_many("student", version.version, [keys[i] for i in miss], computed)
        logits = np.empty((len(keys), rows.shape[1]), dtype=computed.dtype)
        logits[hits], logits[miss] = rows, computed
        return logits

    def teacher_hits(
        self, version: StudentVersion, routes: Routes, answer: Answer, keys: list[bytes]
    ) -> int:
        """Sent items whose teacher answer the cache holds are answered now (returns how
        many): the call carries only the others."""
        assert self.cache is not None
        if not _pinned(version):
            return 0
        sent = routes.send
        hits, rows = self.cache.get_many(
            "teacher", version.versions["teacher"], [keys[i] for i in sent]
        )
        if rows is None:
            return 0
        held = sent[hits]
        answer.probs[held] = rows
        if answer.stage is not None:
            answer.stage[held] = len(answer.stage_names) - 1
        routes.send = sent[~hits]
        return int(held.size)

    def keep(
        self,
        version: StudentVersion,
        keep: Kept,
        answered: np.ndarray,
        teacher_probs: np.ndarray,
        margins: np.ndarray,
    ) -> None:
        """The teacher's answers kept: in the response cache, and (sampled) in the capture.
        Only what the teacher answered: never a degraded or late row."""
        if keep.keys is not None and self.cache is not None and _pinned(version):
            keys = [k for k, a in zip(keep.keys, answered.tolist(), strict=True) if a]
            self.cache.put_many(
                "teacher", version.versions["teacher"], keys, teacher_probs[answered]
            )
        if self.capture is not None and keep.student_probs is not None:
            self.capture.offer(
                {k: v[answered] for k, v in keep.tensors.items()},
                teacher_probs[answered],
                keep.student_probs[answered],
                margins[answered],
                "delegated",
                version.version,
                version.versions["teacher"],
            )


def _pinned(version: StudentVersion) -> bool:
    """Teacher answers are cached only under a pinned teacher version: with Triton's version
    policy choosing (`model_version: ""`), a new teacher model would be served stale answers
    under the same key."""
    return bool(version.manifest.teacher.model_version)
