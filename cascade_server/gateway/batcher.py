"""Cross-request micro-batching: concurrent requests become one model call.

A request submits its (already validated and preprocessed) payload and awaits its own future.
One collector task per batcher takes what is queued, up to `max_items` items, and hands the jobs
to `run`, which resolves every job's future, at once or later (the delegated part of a batch
resolves when the teacher answers, while the next batch runs). With `max_wait_s = 0` nothing is
delayed: under load the requests that arrived during the previous batch form the next one, and a
lone request runs at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ..config.batching import BatchingConfig

__all__ = ["BatchingConfig", "Job", "MicroBatcher"]
log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False)
class Job(Generic[T, R]):
    payload: T
    size: int
    future: asyncio.Future[R] = field(repr=False)
    queued_at: float = 0.0  # loop time of submit: the batch's wait is measured from here


class MicroBatcher(Generic[T, R]):
    def __init__(
        self,
        run: Callable[[list[Job[T, R]]], None],
        config: BatchingConfig,
        *,
        name: str = "batcher",
    ) -> None:
        self._run = run
        self.config = config
        self.name = name
        self._queue: deque[Job[T, R]] = deque()
        self._queued_items = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        if self._task is None:
            self._closed = False
            self._spawn()

    def _spawn(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._collect(), name=f"{self.name}-collector"
        )
        self._task.add_done_callback(self._collector_ended)

    def _collector_ended(self, task: asyncio.Task[None]) -> None:
        """Supervision: a collector that dies (a bug, not a bad batch: those are answered and
        it lives on) fails what is queued, which would otherwise wait forever, and restarts."""
        if self._closed or task is not self._task:
            return
        error = None if task.cancelled() else task.exception()
        log.error("%s: collector died (%r); restarting it", self.name, error)
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError(f"{self.name}: collector died"))
        self._queued_items = 0
        self._wake.clear()
        self._spawn()

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError(f"{self.name} closed"))

    async def submit(self, payload: T, size: int) -> R:
        if self._task is None:
            raise RuntimeError(f"{self.name} used before start()")
        loop = asyncio.get_running_loop()
        job: Job[T, R] = Job(payload, size, loop.create_future(), loop.time())
        self._queue.append(job)
        self._queued_items += size
        if not self._wake.is_set():
            self._wake.set()
        return await job.future

    def _take(self) -> list[Job[T, R]]:
        jobs = [self._queue.popleft()]
        items = jobs[0].size
        while self._queue and items + self._queue[0].size <= self.config.max_items:
            job = self._queue.popleft()
            jobs.append(job)
            items += job.size
        self._queued_items -= items
        return jobs

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            if self.config.max_wait_s > 0 and self._queued_items < self.config.max_items:
                await self._linger(loop)
            jobs = self._take()
            if not self._queue:
                self._wake.clear()
            try:
                self._run(jobs)
            except Exception as exc:  # the jobs' requests answer 500; the collector lives on
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
            # Let responses go out and new requests in before the next batch (Event.wait on a
            # set event does not yield).
            await asyncio.sleep(0)

    async def _linger(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait up to max_wait_s for the batch to fill."""
        deadline = loop.time() + self.config.max_wait_s
        while self._queued_items < self.config.max_items:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            await asyncio.sleep(min(remaining, 0.0005))
