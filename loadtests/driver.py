"""A bounded async load driver for fault tests: C workers post payloads in a loop for a fixed
time (each request with its own timeout), and every request is accounted for: answered (200,
normal or degraded), refused (503/429, with or without Retry-After), failed (other 5xx),
client errors (4xx), or lost (timeout, connection error). Closed loop and in process: light
enough to run beside the gateway on 2 cores, not a peak-throughput tool (use wrk for that).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx2
import numpy as np


@dataclass
class Record:
    start: float  # seconds since the run started
    latency: float
    status: int  # 0: lost (timeout, dropped connection); -1: refused at connect
    degraded: bool = False
    answered_by: str = ""
    retry_after: bool = False


@dataclass
class Run:
    records: list[Record] = field(default_factory=list)
    seconds: float = 0.0

    def window(self, start: float, end: float) -> Run:
        return Run([r for r in self.records if start <= r.start < end], end - start)

    def summary(self) -> dict[str, Any]:
        recs = self.records
        ok = [r for r in recs if r.status == 200]
        refused = [r for r in recs if r.status in (429, 503)]
        lat = np.array([r.latency for r in ok]) * 1e3
        return {
            "sent": len(recs),
            "answered": len(ok),
            "degraded": sum(r.degraded for r in ok),
            "by_teacher": sum(r.answered_by == "teacher" for r in ok),
            "refused": len(refused),
            "refused_with_retry_after": sum(r.retry_after for r in refused),
            "failed_5xx": sum(r.status >= 500 and r.status != 503 for r in recs),
            "client_4xx": sum(400 <= r.status < 500 and r.status != 429 for r in recs),
            "lost": sum(r.status == 0 for r in recs),
            "refused_connect": sum(r.status == -1 for r in recs),
            "throughput_rps": len(ok) / self.seconds if self.seconds else 0.0,
            "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
            "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        }


async def drive(
    url: str,
    payloads: Sequence[dict[str, Any]],
    *,
    concurrency: int,
    seconds: float,
    timeout_s: float = 10.0,
    events: Sequence[tuple[float, Callable[[], Any]]] = (),
) -> Run:
    """Posts `payloads` in turn to `url` from `concurrency` workers for `seconds`; runs each
    `(at_seconds, action)` of `events` (a blocking callable, run in a thread) on schedule."""
    run = Run(seconds=seconds)
    cycle = itertools.cycle(payloads)
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    t0 = time.perf_counter()
    stop = t0 + seconds

    async with httpx2.AsyncClient(timeout=timeout_s, limits=limits) as client:

        async def worker() -> None:
            while time.perf_counter() < stop:
                started = time.perf_counter()
                try:
                    r = await client.post(url, json=next(cycle))
                except httpx2.ConnectError:  # nobody listening: refused, nothing was sent
                    run.records.append(Record(started - t0, time.perf_counter() - started, -1))
                    await asyncio.sleep(0.01)  # a dead server: do not spin
                    continue
                except (httpx2.TransportError, httpx2.TimeoutException):
                    run.records.append(Record(started - t0, time.perf_counter() - started, 0))
                    await asyncio.sleep(0.01)
                    continue
                rec = Record(started - t0, time.perf_counter() - started, r.status_code)
                if r.status_code == 200:
                    body = r.json()
                    body = body["outputs"][0] if "outputs" in body else body
                    rec.degraded, rec.answered_by = body["degraded"], body["answered_by"]
                elif r.status_code in (429, 503):
                    rec.retry_after = "retry-after" in r.headers
                run.records.append(rec)

        async def scheduled(at: float, action: Callable[[], Any]) -> None:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            await asyncio.to_thread(action)

        await asyncio.gather(
            *(worker() for _ in range(concurrency)), *(scheduled(at, a) for at, a in events)
        )
    return run


def recovery_seconds(run: Run, after: float) -> float | None:
    """Seconds from `after` to the first answer by the teacher (the cascade whole again)."""
    times = [r.start + r.latency for r in run.records if r.answered_by == "teacher"]
    later = [t for t in times if t >= after]
    return round(min(later) - after, 2) if later else None
