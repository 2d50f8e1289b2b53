"""Shadow samples: a share of the student's answers (and, in an N-stage cascade, of its tiers')
also goes to the teacher, off the response path, so the gateway can say live how often the
teacher agrees with what the student answers alone (estimates.py, by margin stratum) and with
what the cascade answers without it (every stage; a target accuracy is held on it).

Shadows are the lowest priority there is: a sample waits in a bounded queue and is dropped
(counted, never an error) when the queue is full, when the teacher's circuit is not closed, or
when the teacher has no room to spare for real traffic; a few shadow calls at most are in flight
(`max_in_flight`), with Triton's own priority when configured. They are never counted as
delegation, never feed the circuit breaker, and never touch an answer: the request was answered
before its sample was taken.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

import numpy as np

from ..config.delegation import ShadowConfig
from ..errors import TeacherUnavailable
from ..policy import softmax
from ..preprocess import Batch
from .breaker import State
from .capture import Capture
from .delegation import TeacherStage
from .metrics import Metrics
from .supervise import BurstLog
from .version import StudentVersion
from .window import Window

log = logging.getLogger(__name__)


@dataclass
class _Sample:
    feeds: dict[str, np.ndarray]
    margins: np.ndarray
    classes: np.ndarray  # the answers given (the student's, or a tier's)
    stages: np.ndarray  # the stage that gave each (0: the student)
    version: str  # the student version that answered (its window only counts its own)
    # For the capture (when on): the canonical inputs, the student's probabilities, versions.
    tensors: dict[str, np.ndarray] | None = None
    probs: np.ndarray | None = None
    versions: tuple[str, str] = ("", "")


class Shadow:
    def __init__(
        self,
        cascade: str,
        config: ShadowConfig,
        teacher: TeacherStage,
        window: Window,
        metrics: Metrics,
        seed: int | None = None,
    ) -> None:
        self.cascade = cascade
        self.config = config
        self.teacher = teacher
        self.window = window
        self.metrics = metrics
        self._rng = np.random.default_rng(seed)
        self._queue: deque[_Sample] = deque()
        self._queued = 0
        self._wake = asyncio.Event()
        self._slot = asyncio.Event()  # a shadow call ended: room for the next
        self._calls: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None
        self._failures = BurstLog(logger=log)
        self.capture: Capture | None = None  # samples the teacher answered are offered to it

    @property
    def enabled(self) -> bool:
        return self.config.fraction > 0

    def start(self) -> None:
        if self.enabled:
            self._task = asyncio.get_running_loop().create_task(
                self._drain(), name=f"{self.cascade}-shadow"
            )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for task in list(self._calls):
            task.cancel()
        await asyncio.gather(*self._calls, return_exceptions=True)

    def offer(
        self,
        version: StudentVersion,
        batch: Batch,
        margins: np.ndarray,
        answered: np.ndarray,
        probs: np.ndarray,
        stages: np.ndarray | None = None,
    ) -> None:
        """On the request path: picks this batch's samples (a Bernoulli draw per answer
        given without the teacher, `answered`; `probs` holds them, `stages` says which stage
        gave each, None: the student) and queues them; never waits."""
        if not self.enabled:
            return
        candidates = np.flatnonzero(answered)
        if not candidates.size:
            return
        picked = candidates[self._rng.random(candidates.size) < self.config.fraction]
        if not picked.size:
            return
        if self._queued + picked.size > self.config.queue:
            self.metrics.shadowed(self.cascade, "dropped", int(picked.size))
            return
        tensors = batch.take(picked)
        sample = _Sample(
            version.teacher_feeds(tensors),
            margins[picked],
            probs[picked].argmax(1),
            np.zeros(picked.size, np.int64) if stages is None else stages[picked].astype(np.int64),
            version.version,
        )
        if self.capture is not None:
            sample.tensors, sample.probs = tensors, probs[picked]
            sample.versions = (version.version, version.versions["teacher"])
        self._queue.append(sample)
        self._queued += picked.size
        self._wake.set()

    def _room(self) -> bool:
        """Spare capacity: a closed circuit, and the teacher well within its bounds."""
        stage = self.teacher
        if stage.breaker.state is not State.CLOSED:
            return False
        return len(stage.calls) < max(stage.config.max_in_flight // 2, 1) and stage.spare()

    async def _drain(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                if not self._room():
                    dropped = sum(s.margins.size for s in self._queue)
                    self._queue.clear()
                    self._queued = 0
                    self.metrics.shadowed(self.cascade, "dropped", dropped)
                    break
                if len(self._calls) >= self.config.max_in_flight:
                    self._slot.clear()
                    await self._slot.wait()
                    continue
                sample = self._take()
                task = asyncio.get_running_loop().create_task(self._call(sample))
                self._calls.add(task)
                task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._calls.discard(task)
        self._slot.set()

    def _take(self) -> _Sample:
        """Up to `batch` queued samples as one call."""
        parts = [self._queue.popleft()]
        size = parts[0].margins.size
        while (
            self._queue
            and size + self._queue[0].margins.size <= self.config.batch
            and self._queue[0].version == parts[0].version
        ):
            parts.append(self._queue.popleft())
            size += parts[-1].margins.size
        self._queued -= size
        if len(parts) == 1:
            return parts[0]
        feeds = {k: np.concatenate([p.feeds[k] for p in parts]) for k in parts[0].feeds}
        merged = _Sample(
            feeds,
            np.concatenate([p.margins for p in parts]),
            np.concatenate([p.classes for p in parts]),
            np.concatenate([p.stages for p in parts]),
            parts[0].version,
        )
        first = parts[0]
        if first.tensors is not None and all(
            p.tensors is not None and p.versions == first.versions for p in parts
        ):
            merged.tensors = {
                k: np.concatenate([p.tensors[k] for p in parts if p.tensors is not None])
                for k in first.tensors
            }
            merged.probs = np.concatenate([p.probs for p in parts if p.probs is not None])
            merged.versions = first.versions
        return merged

    async def _call(self, sample: _Sample) -> None:
        n = sample.margins.size
        try:
            logits = await self.teacher.teacher.infer(
                sample.feeds, None, priority=self.config.priority
            )
            if logits.shape[0] != n:
                raise TeacherUnavailable("error", f"teacher answered {logits.shape[0]} of {n}")
        except (TeacherUnavailable, ValueError) as exc:  # never the breaker's business
            self.metrics.shadowed(self.cascade, "failed", n)
            self._failures("cascade %s: a shadow call failed: %s", self.cascade, exc)
            return
        agrees = np.asarray(logits).argmax(1) == sample.classes
        if self.capture is not None and sample.tensors is not None and sample.probs is not None:
            try:
                teacher_probs = softmax(np.asarray(logits))
            except ValueError:  # non-finite: nothing worth keeping
                teacher_probs = None
            own = sample.stages == 0  # the capture keeps the student's probabilities
            if teacher_probs is not None and own.any():
                self.capture.offer(
                    {k: v[own] for k, v in sample.tensors.items()},
                    teacher_probs[own],
                    sample.probs[own],
                    sample.margins[own],
                    "shadow",
                    *sample.versions,
                )
        if sample.version == self.window.version:  # not a retired version's, after a swap
            self.window.shadowed(sample.margins, agrees, sample.stages)
        self.metrics.shadowed(self.cascade, "agree", int(agrees.sum()))
        self.metrics.shadowed(self.cascade, "disagree", int((~agrees).sum()))
