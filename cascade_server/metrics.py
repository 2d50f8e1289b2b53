"""Every Prometheus metric of the gateway, defined here and nowhere else.

With several worker processes, `PROMETHEUS_MULTIPROC_DIR` must be set before prometheus_client
is imported (`cascade-serve` does this); each worker then writes its values to files and a scrape
of any worker aggregates them all. Recording never fails a request: errors are logged and dropped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

OUTCOMES = ("student", "teacher", "degraded")  # and "rejected" for 4xx answers
_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)
_MARGIN_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


class Metrics:
    def __init__(self) -> None:
        self.multiprocess = multiprocess_dir() is not None
        # Single process: metrics live in this app's own registry (so in-process test apps do
        # not share counters). Multiprocess: values go to files and a scrape collects them.
        self._registry = None if self.multiprocess else CollectorRegistry()
        reg = self._registry
        self.requests = Counter(
            "cascade_requests",
            "Predictions by cascade and who answered (items, not HTTP calls)",
            ["cascade", "outcome"],
            registry=reg,
        )
        self.margin = Histogram(
            "cascade_student_margin",
            "Student top-1 minus top-2 probability",
            ["cascade"],
            buckets=_MARGIN_BUCKETS,
            registry=reg,
        )
        self.threshold = Gauge(
            "cascade_threshold",
            "Current delegation threshold",
            ["cascade"],
            registry=reg,
            multiprocess_mode="livemostrecent",
        )
        self.latency = Histogram(
            "cascade_stage_seconds",
            "Latency per stage of a /predict call",
            ["cascade", "stage"],
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.teacher_errors = Counter(
            "cascade_teacher_errors",
            "Failed teacher calls by kind (timeout, unavailable, error)",
            ["cascade", "kind"],
            registry=reg,
        )
        self.in_flight = Gauge(
            "cascade_in_flight_requests",
            "Requests being handled now",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.batch_size = Histogram(
            "cascade_batch_size",
            "Items per model call",
            ["cascade", "model"],
            buckets=_BATCH_BUCKETS,
            registry=reg,
        )
        self.threshold_changes = Counter(
            "cascade_threshold_changes",
            "Admin changes of the threshold",
            ["cascade"],
            registry=reg,
        )
        if reg is not None:
            reg.register(_DelegationRatio(self.requests.collect))

    def prime(self, cascade: str) -> None:
        """Create every labelled series at 0, so dashboards and rate() see them from the start."""
        for outcome in (*OUTCOMES, "rejected"):
            self.requests.labels(cascade, outcome)
        for kind in ("timeout", "unavailable", "error"):
            self.teacher_errors.labels(cascade, kind)
        self.threshold_changes.labels(cascade)

    def render(self) -> tuple[bytes, str]:
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            collector = multiprocess.MultiProcessCollector(registry)
            registry.register(_DelegationRatio(collector.collect))
        else:
            registry = self._registry
        return generate_latest(registry), CONTENT_TYPE_LATEST

    def mark_process_dead(self) -> None:
        if self.multiprocess:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())


class _DelegationRatio:
    """cascade_delegation_ratio: delegated / all predictions since start, per cascade, computed at
    scrape time from the aggregated counters so it is right across worker processes. Windowed
    ratios belong in PromQL (see deploy/prometheus/rules.yml)."""

    def __init__(self, source) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        totals: dict[str, dict[str, float]] = {}
        for family in self._source():
            if family.name != "cascade_requests":
                continue
            for s in family.samples:
                if s.name == "cascade_requests_total":
                    by = totals.setdefault(s.labels["cascade"], {})
                    by[s.labels["outcome"]] = by.get(s.labels["outcome"], 0.0) + s.value
        ratio = GaugeMetricFamily(
            "cascade_delegation_ratio",
            "Share of predictions delegated to the teacher (answered by it or degraded)",
            labels=["cascade"],
        )
        for cascade, by in sorted(totals.items()):
            answered = sum(by.get(o, 0.0) for o in OUTCOMES)
            delegated = by.get("teacher", 0.0) + by.get("degraded", 0.0)
            ratio.add_metric([cascade], delegated / answered if answered else 0.0)
        yield ratio
