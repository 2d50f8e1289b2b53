"""Every Prometheus metric of the gateway, defined here and nowhere else.

With several worker processes, `PROMETHEUS_MULTIPROC_DIR` must be set before prometheus_client
is imported (`cascade-serve` does this); each worker then writes its values to files and a scrape
of any worker aggregates them all. Every recording method here never raises: a metrics failure is
logged and dropped, so callers need no guards. Recording happens once per student batch where the
meaning allows (counts, margins, model latencies); what is per request (total latency, in-flight
count) is buffered and written once per event-loop iteration, which under load means once per
batch of answers, and within one iteration of the last answer when idle.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any, ParamSpec, TypeVar

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric

from .outcomes import DELEGATED, NAMES, counts

log = logging.getLogger(__name__)

# HTTP prediction calls: answered (ok), refused (rejected: 4xx), failed (5xx), or shed at the
# door (503 + Retry-After: too many in flight, or the accuracy floor under load).
STATUSES = ("ok", "rejected", "failed", "shed")
# Why a teacher call failed (its items are answered degraded).
TEACHER_FAILURES = ("timeout", "unavailable", "error")
# Why captured items (gateway/capture.py) were not kept: the queue was full, the format refused
# them, a write failed (disk full, no permission), or the gateway stopped before writing them.
CAPTURE_DROPS = ("queue_full", "invalid", "write_error", "shutdown")
# Why capture shards were deleted: older than retention_s, or beyond max_bytes.
CAPTURE_DELETIONS = ("retention", "size_cap")
UNROUTED = "none"  # the cascade label of a request refused before a cascade was chosen
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

P = ParamSpec("P")
R = TypeVar("R")


def _never_raises(fn: Callable[P, None]) -> Callable[P, None]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:  # metrics must never fail a request
            log.exception("recording metrics failed in %s", fn.__name__)

    return wrapper


def observe_many(child: Any, values: np.ndarray) -> None:
    """Histogram.observe for every value, with one increment per bucket instead of one per value:
    the same samples (bucket counts, count, sum) as a loop of observe(), at a fraction of the cost
    under multiprocess mode, where each increment is a write to a shared file."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return
    bounds = np.asarray(child._upper_bounds, dtype=np.float64)
    counts = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    for i in np.flatnonzero(counts):
        child._buckets[i].inc(int(counts[i]))
    child._sum.inc(float(values.sum()))


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
            "Prediction HTTP calls by status: ok, rejected (4xx), failed (5xx), shed (503)",
            ["cascade", "status"],
            registry=reg,
        )
        self.answered_items = Counter(
            "cascade_items",
            "Answered items (inputs; a batch request holds several) by outcome: who answered "
            "and why (confident, delegated, forced_teacher, forced_student, teacher_failed, "
            "circuit_open, teacher_busy, deadline)",
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
        self.control_store_up = Gauge(
            "cascade_control_store_up",
            "The runtime control store (file or Redis) is reachable (0: last values in force)",
            registry=reg,
            multiprocess_mode="livemin",
        )
        self.expected_delegation = Gauge(
            "cascade_expected_delegation_ratio",
            "Delegation ratio the threshold in force is calibrated for (the configured target; "
            "what the drift alert compares the observed ratio with)",
            ["cascade"],
            registry=reg,
            multiprocess_mode="livemostrecent",
        )
        self.stage_items = Counter(
            "cascade_stage_items",
            "Answered items by the stage whose answer was returned: student, each tier of an "
            "N-stage cascade by its name, teacher",
            ["cascade", "stage"],
            registry=reg,
        )
        self.latency = Histogram(
            "cascade_stage_seconds",
            "Latency per stage: preprocess, queue (waiting for a batch to start), total and "
            "overhead per request; student and teacher per model call (one call serves a "
            "micro-batch of requests)",
            ["cascade", "stage"],
            buckets=_LATENCY_BUCKETS,
            registry=reg,
        )
        self.teacher_errors = Counter(
            "cascade_teacher_errors",
            "Teacher calls failed, by kind (timeout, unavailable, error)",
            ["cascade", "kind"],
            registry=reg,
        )
        self.circuit_state = Gauge(
            "cascade_teacher_circuit_state",
            "Teacher circuit breaker: 0 closed, 1 half-open, 2 open (the worst worker's)",
            ["cascade"],
            registry=reg,
            multiprocess_mode="livemax",
        )
        self.circuit_transitions = Counter(
            "cascade_teacher_circuit_transitions",
            "Teacher circuit breaker transitions, by the state entered",
            ["cascade", "to"],
            registry=reg,
        )
        self.student_info = Gauge(
            "cascade_student_version_info",
            "The student version each cascade serves (1; 0 for a version swapped out)",
            ["cascade", "version"],
            registry=reg,
            multiprocess_mode="livemax",
        )
        self.loop_tasks = Gauge(
            "cascade_event_loop_tasks",
            "asyncio tasks alive in the workers' event loops, at the last scrape (a leak grows "
            "it; the soak test watches it)",
            registry=reg,
            multiprocess_mode="livesum",
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
        # Live control (controller.py): one writer per interval, so the most recent value.
        self.controller_moves = Counter(
            "cascade_controller_moves",
            "Threshold moves made by the delegation controller (not audited: metrics)",
            ["cascade"],
            registry=reg,
        )
        self.live_delegation = Gauge(
            "cascade_live_delegation_ratio",
            "Share of routed items delegated over the live window (all workers and replicas)",
            ["cascade"],
            registry=reg,
            multiprocess_mode="livemostrecent",
        )
        self.live_cost_gauge = Gauge(
            "cascade_live_expected_cost",
            "Compute per item over the live window, in the calibration's units (teacher = 1; "
            "each item pays every stage up to the one that answered), while a cost budget is "
            "held",
            ["cascade"],
            registry=reg,
            multiprocess_mode="livemostrecent",
        )
        self.live_items = Gauge(
            "cascade_live_window_items",
            "Items in the live window the controller reads (all workers and replicas)",
            ["cascade"],
            registry=reg,
            multiprocess_mode="livemostrecent",
        )
        self.live_student = Gauge(
            "cascade_live_student_agreement",
            "Live estimate of the student's agreement with the teacher on what it answers "
            "alone (shadow samples; teacher as reference), and its confidence bounds",
            ["cascade", "bound"],
            registry=reg,
            multiprocess_mode="livemostrecent",
        )
        self.live_cascade = Gauge(
            "cascade_live_cascade_agreement",
            "Live estimate of the cascade's agreement with the teacher over all answers",
            ["cascade", "bound"],
            registry=reg,
            multiprocess_mode="livemostrecent",
        )
        self.calibrated_student = Gauge(
            "cascade_calibrated_student_agreement",
            "The student's agreement with the teacher on what it answers alone at the "
            "threshold in force, on the calibration split, with its confidence bounds",
            ["cascade", "bound"],
            registry=reg,
            multiprocess_mode="livemostrecent",
        )
        self.shadow_items = Counter(
            "cascade_shadow_items",
            "Answers given without the teacher (the student's, a tier's) sampled for the teacher "
            "off the response path, by result: agree, "
            "disagree, dropped (no room: shed first), failed",
            ["cascade", "result"],
            registry=reg,
        )
        self.capture_items = Counter(
            "cascade_capture_items",
            "Delegated items and shadow samples captured for training (after the sampling "
            "draw), by result: kept (written), dropped (with a reason: queue_full, invalid, "
            "write_error, shutdown)",
            ["cascade", "result", "reason"],
            registry=reg,
        )
        self.capture_size = Gauge(
            "cascade_capture_bytes",
            "Size of the cascade's capture directory, at the last write or sweep",
            ["cascade"],
            registry=reg,
            multiprocess_mode="livemostrecent",  # every worker sees the same directory
        )
        self.capture_deletions = Counter(
            "cascade_capture_shards_deleted",
            "Capture shards deleted, by why: retention (older than retention_s), size_cap",
            ["cascade", "why"],
            registry=reg,
        )
        # What the cascade saved against teacher-only serving, in the calibration's cost units
        # (teacher = 1 per item): cascade:compute_saved_ratio:rate5m in the rules.
        self.teacher_limit_gauge = Gauge(
            "cascade_teacher_items_limit",
            "Items in flight the teacher is given now (load-aware delegation: follows its "
            "latency against CASCADE_LOAD__SLO_S)",
            ["cascade"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        # Tiers on Triton (N-stage cascades): each has the teacher's kind of stage.
        self.tier_errors = Counter(
            "cascade_tier_errors",
            "Calls to a tier on Triton failed, by kind (timeout, unavailable, error)",
            ["cascade", "tier", "kind"],
            registry=reg,
        )
        self.tier_circuit_state = Gauge(
            "cascade_tier_circuit_state",
            "A Triton tier's circuit breaker: 0 closed, 1 half-open, 2 open (the worst worker's)",
            ["cascade", "tier"],
            registry=reg,
            multiprocess_mode="livemax",
        )
        self.tier_limit_gauge = Gauge(
            "cascade_tier_items_limit",
            "Items in flight a Triton tier is given now (as cascade_teacher_items_limit)",
            ["cascade", "tier"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.overrides = Counter(
            "cascade_overrides",
            "Requests that overrode the policy, by what (delegate_never, delegate_always, "
            "threshold, deadline)",
            ["cascade", "kind"],
            registry=reg,
        )
        self.teacher_avoided = Counter(
            "cascade_teacher_items_avoided",
            "Items not sent to the teacher (that teacher-only serving would have sent)",
            ["cascade"],
            registry=reg,
        )
        self.compute_units = Counter(
            "cascade_compute_units",
            "Compute spent, in the calibration's cost units, by tier (student, teacher); and "
            "what teacher-only serving would have spent (teacher_only)",
            ["cascade", "tier"],
            registry=reg,
        )
        # The response cache (cache.py): one per cascade and worker, so the sizes add up.
        self.cache_requests = Counter(
            "cascade_cache_requests",
            "Response cache lookups per item, by tier (student, teacher, a stage) and result: "
            "hit, miss",
            ["cascade", "tier", "result"],
            registry=reg,
        )
        self.cache_evictions = Counter(
            "cascade_cache_evictions",
            "Response cache entries evicted (least recently used, past max_entries or "
            "max_bytes), by tier",
            ["cascade", "tier"],
            registry=reg,
        )
        self.cache_entries = Gauge(
            "cascade_cache_entries",
            "Entries in the response cache (all workers)",
            ["cascade"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.cache_bytes = Gauge(
            "cascade_cache_bytes",
            "Bytes the response cache counts against max_bytes (all workers)",
            ["cascade"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        if reg is not None:
            reg.register(_DelegationRatio(self.answered_items.collect))
        # Per-request observations waiting for the next flush: (cascade, preprocess, queue,
        # total, overhead) seconds; and the in-flight count the gauge shows after it.
        self._pending: list[tuple[str, float, float, float, float]] = []
        self._in_flight = 0
        self._shown_in_flight = 0
        self._flush_scheduled = False
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._shown: dict[str, float] = {}  # gauges written only when their value changes

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once: prometheus_client validates the labels
        and takes a lock on every call, which per batch adds up on the hot path."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _schedule_flush(self) -> None:
        if self._flush_scheduled:
            return
        self._flush_scheduled = True
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:  # no loop (a synchronous caller): write now
            self.flush()

    @_never_raises
    def flush(self) -> None:
        """Writes the buffered per-request observations (one bucket increment per bucket)."""
        self._flush_scheduled = False
        pending, self._pending = self._pending, []
        if self._in_flight != self._shown_in_flight:
            self._shown_in_flight = self._in_flight
            self.in_flight.set(self._in_flight)
        if not pending:
            return
        for cascade in {p[0] for p in pending}:
            rows = np.array([p[1:] for p in pending if p[0] == cascade], dtype=np.float64)
            self._child(self.requests, cascade, "ok").inc(len(rows))
            for j, stage in enumerate(("preprocess", "queue", "total", "overhead")):
                observe_many(self._child(self.latency, cascade, stage), rows[:, j])

    @_never_raises
    def prime(self, cascade: str, stages: tuple[str, ...] = ("student", "teacher")) -> None:
        """Create every labelled series at 0, so dashboards and rate() see them from the start."""
        for status in STATUSES:
            self.requests.labels(cascade, status)
        for outcome in NAMES:
            self.answered_items.labels(cascade, outcome)
        for stage in stages:
            self.stage_items.labels(cascade, stage)
        for kind in TEACHER_FAILURES:
            self.teacher_errors.labels(cascade, kind)
        self.threshold_changes.labels(cascade)
        self.controller_moves.labels(cascade)
        self.teacher_avoided.labels(cascade)
        for tier in ("student", "teacher", "teacher_only"):
            self.compute_units.labels(cascade, tier)
        for result in ("agree", "disagree", "dropped", "failed"):
            self.shadow_items.labels(cascade, result)
        self.capture_items.labels(cascade, "kept", "")
        for reason in CAPTURE_DROPS:
            self.capture_items.labels(cascade, "dropped", reason)
        for why in CAPTURE_DELETIONS:
            self.capture_deletions.labels(cascade, why)
        self.circuit_state.labels(cascade).set(0)

    def request_started(self) -> None:
        self._in_flight += 1
        self._schedule_flush()

    def request_finished(self) -> None:
        self._in_flight -= 1
        self._schedule_flush()

    @_never_raises
    def rejected(self, cascade: str) -> None:
        self.requests.labels(cascade, "rejected").inc()

    @_never_raises
    def circuit(self, cascade: str, state: int, name: str) -> None:
        self.circuit_state.labels(cascade).set(state)
        self.circuit_transitions.labels(cascade, name).inc()

    @_never_raises
    def student_version(self, cascade: str, old: str | None, new: str) -> None:
        if old is not None and old != new:
            self.student_info.labels(cascade, old).set(0)
        self.student_info.labels(cascade, new).set(1)

    @_never_raises
    def shed(self, cascade: str) -> None:
        self.requests.labels(cascade, "shed").inc()

    @_never_raises
    def failed(self, cascade: str) -> None:
        self.requests.labels(cascade, "failed").inc()

    @_never_raises
    def student_batch(self, cascade: str, margins: np.ndarray, seconds: float) -> None:
        """One student call over a micro-batch: its margins, size and latency."""
        observe_many(self._child(self.margin, cascade), margins)
        self._child(self.latency, cascade, "student").observe(seconds)
        self._child(self.batch_size, cascade, "student").observe(len(margins))

    @_never_raises
    def teacher_call(self, cascade: str, n: int, seconds: float, error: str | None) -> None:
        self._child(self.latency, cascade, "teacher").observe(seconds)
        self._child(self.batch_size, cascade, "teacher").observe(n)
        if error is not None:
            self.teacher_errors.labels(cascade, error).inc()

    @_never_raises
    def items(self, cascade: str, outcomes: np.ndarray) -> None:
        """Items answered, by outcome code (outcomes.py): one increment per outcome present."""
        if len(outcomes) == 0:
            return
        for code, count in enumerate(counts(outcomes).tolist()):
            if count:
                self._child(self.answered_items, cascade, NAMES[code]).inc(count)

    @_never_raises
    def answered_by(self, cascade: str, names: tuple[str, ...], counts: np.ndarray) -> None:
        """Items answered, by the stage that answered (`counts` per stage in `names`)."""
        for code, count in enumerate(counts.tolist()):
            if count:
                self._child(self.stage_items, cascade, names[code]).inc(count)

    @_never_raises
    def tier_calls(
        self,
        cascade: str,
        names: tuple[str, ...],
        rows: list[int],
        seconds: list[float],
        costs: tuple[float, ...],
    ) -> None:
        """One micro-batch's tier calls (N-stage cascades): latency, size and compute."""
        for name, n, s, cost in zip(names, rows, seconds, costs, strict=True):
            if n:
                self._child(self.latency, cascade, name).observe(s)
                self._child(self.batch_size, cascade, name).observe(n)
                self._child(self.compute_units, cascade, name).inc(n * cost)

    def request_done(
        self, cascade: str, preprocess: float, queue: float, total: float, models: float
    ) -> None:
        """Per answered request: its preprocessing, its wait for a batch, its total, and the
        gateway's own overhead (the total less all of those and the model calls it waited
        for). Buffered until the flush."""
        overhead = max(total - preprocess - queue - models, 0.0)
        self._pending.append((cascade, preprocess, queue, total, overhead))
        self._schedule_flush()

    @_never_raises
    def set_threshold(self, cascade: str, value: float) -> None:
        if self._shown.get(cascade) != value:
            self._child(self.threshold, cascade).set(value)
            self._shown[cascade] = value

    @_never_raises
    def control_store(self, up: bool) -> None:
        self.control_store_up.set(1 if up else 0)

    @_never_raises
    def set_expected_delegation(self, cascade: str, ratio: float) -> None:
        self.expected_delegation.labels(cascade).set(ratio)

    @_never_raises
    def threshold_changed(self, cascade: str) -> None:
        self.threshold_changes.labels(cascade).inc()

    @_never_raises
    def controller_moved(self, cascade: str) -> None:
        self.controller_moves.labels(cascade).inc()

    @_never_raises
    def live(
        self,
        cascade: str,
        window: Any,
        threshold: float,
        student: Any,
        cascade_estimate: Any,
        calibration: Any,
    ) -> None:
        """The live window and estimates, once per controller interval."""
        self.live_items.labels(cascade).set(window.items)
        rate = window.delegation_rate
        if rate is not None:
            self.live_delegation.labels(cascade).set(rate)
        for gauge, estimate in (
            (self.live_student, student),
            (self.live_cascade, cascade_estimate),
        ):
            if estimate.known:
                gauge.labels(cascade, "estimate").set(estimate.value)
                gauge.labels(cascade, "lower").set(estimate.lower)
                gauge.labels(cascade, "upper").set(estimate.upper)
        row = calibration.accepted_at(threshold)
        if row is not None and row.accepted:
            from ..bundle import clopper_pearson

            agreeing = row.accepted - row.accepted_disagreements
            lower, upper = clopper_pearson(agreeing, row.accepted)
            self.calibrated_student.labels(cascade, "estimate").set(agreeing / row.accepted)
            self.calibrated_student.labels(cascade, "lower").set(lower)
            self.calibrated_student.labels(cascade, "upper").set(upper)

    @_never_raises
    def overridden(self, cascade: str, kinds: list[str]) -> None:
        for kind in kinds:
            self.overrides.labels(cascade, kind).inc()

    @_never_raises
    def live_cost(self, cascade: str, value: float | None) -> None:
        """None: no cost budget held (the series goes, rather than show a stale value)."""
        if value is not None:
            self.live_cost_gauge.labels(cascade).set(value)
            return
        try:
            self.live_cost_gauge.remove(cascade)
        except KeyError:
            pass

    @_never_raises
    def teacher_limit(self, cascade: str, limit: float) -> None:
        self.teacher_limit_gauge.labels(cascade).set(limit)

    @_never_raises
    def tier_circuit(self, cascade: str, tier: str, state: int, name: str) -> None:
        self.tier_circuit_state.labels(cascade, tier).set(state)

    @_never_raises
    def tier_error(self, cascade: str, tier: str, kind: str) -> None:
        self.tier_errors.labels(cascade, tier, kind).inc()

    @_never_raises
    def tier_limit(self, cascade: str, tier: str, limit: float) -> None:
        self.tier_limit_gauge.labels(cascade, tier).set(limit)

    @_never_raises
    def shadowed(self, cascade: str, result: str, n: int) -> None:
        if n:
            self.shadow_items.labels(cascade, result).inc(n)

    @_never_raises
    def captured(self, cascade: str, result: str, n: int, reason: str = "") -> None:
        """Captured items `kept`, or `dropped` for `reason` (CAPTURE_DROPS). Thread-safe: the
        capture writer records from its own thread."""
        if n:
            self._child(self.capture_items, cascade, result, reason).inc(n)

    @_never_raises
    def capture_bytes(self, cascade: str, n: int) -> None:
        self._child(self.capture_size, cascade).set(n)

    @_never_raises
    def capture_deleted(self, cascade: str, why: str, n: int) -> None:
        if n:
            self._child(self.capture_deletions, cascade, why).inc(n)

    @_never_raises
    def savings(
        self, cascade: str, items: int, sent: int, cost_student: float, cost_teacher: float
    ) -> None:
        """Per batch: what it cost against what teacher-only serving would have."""
        self._child(self.teacher_avoided, cascade).inc(items - sent)
        self._child(self.compute_units, cascade, "student").inc(items * cost_student)
        if sent:
            self._child(self.compute_units, cascade, "teacher").inc(sent * cost_teacher)
        self._child(self.compute_units, cascade, "teacher_only").inc(items * cost_teacher)

    @_never_raises
    def cache(self, cascade: str, tier: str, hits: int, misses: int) -> None:
        """One response cache lookup of hits + misses items (0, 0 creates the series)."""
        self._child(self.cache_requests, cascade, tier, "hit").inc(hits)
        self._child(self.cache_requests, cascade, tier, "miss").inc(misses)

    @_never_raises
    def cache_size(self, cascade: str, entries: int, nbytes: int, evicted: dict[str, int]) -> None:
        """The response cache's size after a change, and its evictions by tier since the last."""
        self._child(self.cache_entries, cascade).set(entries)
        self._child(self.cache_bytes, cascade).set(nbytes)
        for tier, n in evicted.items():
            self._child(self.cache_evictions, cascade, tier).inc(n)

    @_never_raises
    def event_loop_tasks(self) -> None:
        self.loop_tasks.set(len(asyncio.all_tasks()))

    def render(self) -> tuple[bytes, str]:
        self.flush()
        self.event_loop_tasks()
        if self.multiprocess:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            collector = multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            registry.register(_DelegationRatio(collector.collect))
        else:
            assert self._registry is not None
            registry = self._registry
        return generate_latest(registry), CONTENT_TYPE_LATEST

    @_never_raises
    def mark_process_dead(self) -> None:
        if self.multiprocess:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


class _DelegationRatio:
    """cascade_delegation_ratio: items the policy delegated (whoever then answered them) / all
    items since start, per cascade, computed at scrape time from the aggregated counters so it
    is right across worker processes. Windowed ratios belong in PromQL (see
    deploy/prometheus/rules.yml)."""

    _DELEGATED = frozenset(name for name, d in zip(NAMES, DELEGATED, strict=True) if d)

    def __init__(self, source: Callable[[], Iterable[Metric]]) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        totals: dict[str, dict[str, float]] = {}
        for family in self._source():
            if family.name != "cascade_items":
                continue
            for s in family.samples:
                if s.name == "cascade_items_total" and s.labels["cascade"] != UNROUTED:
                    by = totals.setdefault(s.labels["cascade"], {})
                    by[s.labels["outcome"]] = by.get(s.labels["outcome"], 0.0) + s.value
        ratio = GaugeMetricFamily(
            "cascade_delegation_ratio",
            "Share of items the policy delegated to the teacher since start (answered by it, "
            "or kept by the student because it failed, was busy or late)",
            labels=["cascade"],
        )
        for cascade, by in sorted(totals.items()):
            answered = sum(by.values())
            delegated = sum(v for k, v in by.items() if k in self._DELEGATED)
            ratio.add_metric([cascade], delegated / answered if answered else 0.0)
        yield ratio
