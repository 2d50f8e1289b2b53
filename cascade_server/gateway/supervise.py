"""Background loops that must not die quietly, and logs that must not flood."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)
_RECANCEL_S = 0.5  # how long `Periodic.stop` waits before cancelling again


class BurstLog:
    """Logs the first failure of a burst, then at most one summary per `every_s`."""

    def __init__(self, every_s: float = 10.0, logger: logging.Logger = log) -> None:
        self.every_s = every_s
        self.logger = logger
        self._last = -float("inf")
        self._suppressed = 0

    def __call__(self, msg: str, *args: object, level: int = logging.WARNING) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            extra = f" ({self._suppressed} more since the last report)" if self._suppressed else ""
            self.logger.log(level, msg + extra, *args)
            self._last, self._suppressed = now, 0
        else:
            self._suppressed += 1


class Periodic:
    """Runs `step` every `interval_s` in a task of its own. A step that raises is logged (at
    most once per burst) and the loop goes on; if the task itself ends unexpectedly it is
    restarted. `stop` cancels it and waits."""

    def __init__(self, name: str, interval_s: float, step: Callable[[], Awaitable[None]]) -> None:
        self.name = name
        self.interval_s = interval_s
        self.step = step
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._failures = BurstLog(every_s=30.0)
        self.steps = 0  # completed steps, for tests and health details

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)
        self._task.add_done_callback(self._ended)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.step()
            except Exception as exc:
                self._failures("%s: a step failed: %r", self.name, exc, level=logging.ERROR)
                log.debug("%s step failure", self.name, exc_info=True)
            self.steps += 1

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self._stopping or task is not self._task:
            return
        error = None if task.cancelled() else task.exception()
        log.error("%s ended unexpectedly (%r); restarting it", self.name, error)
        self.start()

    async def stop(self) -> None:
        """Cancels the loop and waits for it to end. A cancellation a step swallows (its own
        code, or a library's race) is repeated: the loop ends, and shutdown never hangs on it."""
        self._stopping = True
        task, self._task = self._task, None
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=_RECANCEL_S)
        if task is not None and not task.cancelled():
            task.exception()  # retrieved: a step's failure was logged by the loop already
