"""Graceful drain on SIGTERM: readiness goes 503 first, requests are still served for
`drain_s` (load balancers and Kubernetes endpoints need a few seconds to stop routing here),
then uvicorn's own shutdown runs: no new connections, in-flight requests finish within its
bound, the lifespan closes the cascades (and `cascade-serve` stops a bundled Triton after that).

Installed per worker process from the lifespan, after uvicorn has installed its handlers: the
first SIGTERM starts the drain and hands over to uvicorn's handler when it ends; a second one, or
SIGINT (Ctrl-C), goes to uvicorn at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)


class Drain:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.draining = False
        self._previous: Any = None

    def install(self) -> None:
        if self.seconds <= 0:
            return
        self._previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        loop = asyncio.get_running_loop()
        self._loop = loop

    def _on_sigterm(self, sig: int, frame: FrameType | None) -> None:
        if self.draining:  # a second SIGTERM: no more waiting
            self._hand_over(sig, frame)
            return
        self.draining = True
        log.warning("SIGTERM: draining for %.1fs (readiness 503, still serving)", self.seconds)
        self._loop.call_soon_threadsafe(
            self._loop.call_later, self.seconds, self._hand_over, sig, None
        )

    def _hand_over(self, sig: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, self._previous)
        if callable(self._previous):
            self._previous(sig, frame)
        else:  # no handler of uvicorn's (not under uvicorn): the default action
            signal.raise_signal(sig)
