"""Capture: delegated items (and shadow samples) written to disk for the next student's
training, off the response path, in the shard format of cascade_server/capture.py.

`offer` runs on the event loop after the answers were handed out: it draws the sample, copies
the rows into a bounded queue and returns; it never waits and never raises. One writer thread
groups the queued rows into shards (one student/teacher version pair each), writes them, and
keeps the directory within its age and size bounds. Every item is counted: kept, or dropped
with a reason (a full queue, a failed write, ...); a failed write is logged and the writer goes
on, so a disk that fills up or a directory that goes away costs data, never an answer.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from .. import capture as shard_format
from ..config.capture import CaptureConfig
from .metrics import Metrics
from .supervise import BurstLog

log = logging.getLogger(__name__)


@dataclass
class _Rows:
    inputs: dict[str, np.ndarray]
    teacher_probs: np.ndarray
    student_probs: np.ndarray
    margins: np.ndarray
    source: np.ndarray
    versions: tuple[str, str]  # (student, teacher)
    at: float  # monotonic time queued

    def __len__(self) -> int:
        return len(self.margins)

    @property
    def group(self) -> tuple[object, ...]:
        """Rows that can share a shard: the same versions and input shapes."""
        return self.versions, tuple((k, v.shape[1:]) for k, v in sorted(self.inputs.items()))

    def split(self, n: int) -> tuple[_Rows, _Rows]:
        def part(s: slice) -> _Rows:
            inputs = {k: v[s] for k, v in self.inputs.items()}
            arrays = (self.teacher_probs[s], self.student_probs[s], self.margins[s], self.source[s])
            return _Rows(inputs, *arrays, self.versions, self.at)

        return part(slice(None, n)), part(slice(n, None))


class Capture:
    def __init__(
        self,
        cascade: str,
        config: CaptureConfig,
        metrics: Metrics,
        modality: str,
        classes: tuple[str, ...],
        seed: int | None = None,
    ) -> None:
        self.cascade = cascade
        self.config = config
        self.metrics = metrics
        self.modality = modality
        self.classes = classes
        root = config.directory
        self.directory = None if root is None else root / cascade
        self._rng = np.random.default_rng(seed)
        self._queue: deque[_Rows] = deque()
        self._queued = 0
        self._cond = threading.Condition()  # guards the queue; wakes the writer
        self._closing = False
        self._thread: threading.Thread | None = None
        self._offer_failures = BurstLog(logger=log)
        self._write_failures = BurstLog(logger=log)
        self._sweep_failures = BurstLog(logger=log)
        self._last_sweep = -float("inf")

    @property
    def enabled(self) -> bool:
        return self.directory is not None and self.config.fraction > 0

    def start(self) -> None:
        """Starts the writer thread (which creates the directory: no file I/O here)."""
        if not self.enabled or (self._thread is not None and self._thread.is_alive()):
            return
        self._closing = False
        self._thread = threading.Thread(
            target=self._write_loop, name=f"{self.cascade}-capture", daemon=True
        )
        self._thread.start()

    async def close(self, timeout_s: float = 10.0) -> None:
        """Writes what is queued, for at most `timeout_s`; what is left then is dropped
        (`shutdown`). A write still running then finishes on its own (a daemon thread)."""
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._closing = True
            self._cond.notify()
        await asyncio.to_thread(thread.join, timeout_s)
        with self._cond:
            left, self._queued = self._queued, 0
            self._queue.clear()
        self.metrics.captured(self.cascade, "dropped", left, "shutdown")
        self._thread = None

    def offer(
        self,
        tensors: dict[str, np.ndarray],
        teacher_probs: np.ndarray,
        student_probs: np.ndarray,
        margins: np.ndarray,
        source: str,
        student_version: str,
        teacher_version: str,
    ) -> None:
        """On the event loop: n items (every array holds n rows; probabilities, not logits)
        offered for capture; `source` is "delegated" or "shadow". Copies what it keeps."""
        if not self.enabled or (source == "shadow" and not self.config.shadow):
            return
        n = 0
        try:
            n = len(margins)
            code = shard_format.SOURCES.index(source)
            arrays = (teacher_probs, student_probs, margins, *tensors.values())
            if set(tensors) != set(shard_format.INPUTS[self.modality]):
                raise ValueError(f"inputs {sorted(tensors)} for a {self.modality} cascade")
            if any(len(a) != n for a in arrays):
                raise ValueError(f"rows disagree: {[len(a) for a in arrays]}")
            picked = np.flatnonzero(self._rng.random(n) < self.config.fraction)
            n = len(picked)
            room = max(self.config.queue_items - self._queued, 0)  # a racy read: a bound
            self.metrics.captured(self.cascade, "dropped", max(n - room, 0), "queue_full")
            picked, n = picked[:room], min(n, room)
            if not n:
                return
            spec = shard_format.INPUTS[self.modality]
            rows = _Rows(  # fancy indexing copies: the caller may reuse its arrays
                {k: np.asarray(v[picked], dtype=spec[k][0]) for k, v in tensors.items()},
                np.asarray(teacher_probs[picked], dtype=np.float32),
                np.asarray(student_probs[picked], dtype=np.float32),
                np.asarray(margins[picked], dtype=np.float32),
                np.full(n, code, dtype=np.uint8),
                (student_version, teacher_version),
                time.monotonic(),
            )
        except Exception as exc:  # capture never fails a request
            self.metrics.captured(self.cascade, "dropped", n, "invalid")
            self._offer_failures("cascade %s: capture refused items: %r", self.cascade, exc)
            return
        with self._cond:
            was_empty = not self._queue
            self._queue.append(rows)
            self._queued += n
            if was_empty or self._queued >= self.config.shard_items:
                self._cond.notify()  # the writer's deadline or a full shard

    # The writer thread.
    def _write_loop(self) -> None:
        assert self.directory is not None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # writes retry it: a directory that appears later recovers
            log.error("cascade %s: capture directory %s: %s", self.cascade, self.directory, exc)
        while True:
            with self._cond:
                if not self._due() and not self._closing:
                    self._cond.wait(self._wait_s())
                closing = self._closing  # closing: everything queued is due
                shard = self._take() if self._due() or (closing and self._queue) else None
            if shard:
                self._write(shard)
            elif closing:
                return
            if shard or time.monotonic() - self._last_sweep >= self.config.flush_s:
                self._sweep()

    def _due(self) -> bool:
        """A full shard is queued, or the oldest row has waited flush_s."""
        if not self._queue:
            return False
        waited = time.monotonic() - self._queue[0].at
        return self._queued >= self.config.shard_items or waited >= self.config.flush_s

    def _wait_s(self) -> float:
        if not self._queue:
            return self.config.flush_s  # idle: the next sweep
        return max(self.config.flush_s - (time.monotonic() - self._queue[0].at), 0.001)

    def _take(self) -> list[_Rows]:
        """Up to shard_items rows of the oldest row's group, the rest left in order."""
        group, size = self._queue[0].group, 0
        taken: list[_Rows] = []
        rest: deque[_Rows] = deque()
        for rows in self._queue:
            room = self.config.shard_items - size
            if room <= 0 or rows.group != group:
                rest.append(rows)
                continue
            if len(rows) > room:
                rows, tail = rows.split(room)
                rest.append(tail)
            taken.append(rows)
            size += len(rows)
        self._queue, self._queued = rest, self._queued - size
        return taken

    def _write(self, parts: list[_Rows]) -> None:
        assert self.directory is not None
        n = sum(len(p) for p in parts)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            shard_format.write_shard(
                self.directory,
                cascade=self.cascade,
                modality=self.modality,
                classes=self.classes,
                inputs={k: np.concatenate([p.inputs[k] for p in parts]) for k in parts[0].inputs},
                teacher_probs=np.concatenate([p.teacher_probs for p in parts]),
                student_probs=np.concatenate([p.student_probs for p in parts]),
                margins=np.concatenate([p.margins for p in parts]),
                source=np.concatenate([p.source for p in parts]),
                student_version=parts[0].versions[0],
                teacher_version=parts[0].versions[1],
            )
        except ValueError as exc:  # the format refused them (non-normalised probabilities, ...)
            self.metrics.captured(self.cascade, "dropped", n, "invalid")
            self._write_failures("cascade %s: capture refused a shard: %s", self.cascade, exc)
        except Exception as exc:  # OSError mostly (ENOSPC, EACCES, EROFS): lose data, not serving
            self.metrics.captured(self.cascade, "dropped", n, "write_error")
            self._write_failures("cascade %s: capture write failed: %r", self.cascade, exc)
        else:
            self.metrics.captured(self.cascade, "kept", n)

    def _sweep(self) -> None:
        assert self.directory is not None
        self._last_sweep = time.monotonic()
        try:
            pruned = shard_format.prune(
                self.directory, self.config.max_bytes, self.config.retention_s
            )
        except OSError as exc:
            self._sweep_failures("cascade %s: capture sweep failed: %r", self.cascade, exc)
            return
        self.metrics.capture_deleted(self.cascade, "retention", pruned.retention)
        self.metrics.capture_deleted(self.cascade, "size_cap", pruned.size_cap)
        self.metrics.capture_bytes(self.cascade, pruned.bytes)
