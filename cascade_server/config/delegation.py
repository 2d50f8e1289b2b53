"""Live delegation control (gateway/controller.py, gateway/shadow.py, gateway/delegation.py,
gateway/options.py): the controller that holds a target, the teacher's load bound, shadow
sampling, and what a request may override."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ControllerConfig(BaseModel):
    """Holds `target_delegation_rate` and `max_student_error` online: CASCADE_CONTROLLER__*."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = True
    # How often each worker folds its margins into its window, publishes it, and (whichever
    # worker finds the shared state due first) moves the threshold.
    interval_s: float = Field(default=1.0, gt=0, le=60)
    # The sliding window: the last `window_items` items of each worker, in `buckets` buckets,
    # and none older than `window_s` (at low traffic the window is time-bound, at high traffic
    # it follows the last items, so a shift is seen within about window_items items).
    window_items: int = Field(default=1000, ge=50)
    window_s: float = Field(default=60.0, gt=0)
    buckets: int = Field(default=10, ge=2, le=100)
    # The evidence a threshold comes back on (target_accuracy's cheaper row, max_student_error's
    # descent): shadow tallies over a longer horizon than the window, the last `evidence_items`
    # items and none older than `evidence_s` (a 95% bound under a few percent takes thousands
    # of samples, which a window of a thousand items at a 20% shadow share never holds). Moves
    # that protect accuracy read the window: they follow a shift within it.
    evidence_items: int = Field(default=20_000, ge=50)
    evidence_s: float = Field(default=900.0, gt=0)
    # No move before the merged window holds this many items.
    min_items: int = Field(default=200, ge=1)
    # The most the threshold moves per step, and the smallest move made (hysteresis: a
    # desired change below it is not made, so noise does not flap the threshold).
    max_step: float = Field(default=0.2, gt=0, le=1)
    min_change: float = Field(default=0.005, ge=0, le=0.5)
    # Hysteresis on the rate (target_delegation_rate): no move while the window's delegation
    # is within this of the target.
    deadband: float = Field(default=0.01, ge=0, le=0.5)
    # DDSketch relative accuracy of the margin quantiles.
    relative_accuracy: float = Field(default=0.005, gt=0, lt=0.5)
    # A worker's published window older than this is ignored (the worker is gone).
    worker_ttl_s: float = Field(default=10.0, gt=0)
    # Confidence of the live error bound (max_student_error) and of the intervals exported.
    confidence: float = Field(default=0.95, gt=0.5, lt=1)


class LoadConfig(BaseModel):
    """Load-aware delegation: how much the teacher is given when it saturates."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Items in flight to the teacher per cascade and worker: the bound starts at the maximum
    # and, with an SLO, follows the teacher's observed latency (AIMD: shrinks by `backoff` when
    # a call is slower than the SLO, grows by n/limit for a call of n items within it: about one
    # item per limit's worth answered, as TCP's congestion window does). Items past the
    # bound are answered by the student (`teacher_busy`), lowest margins sent first.
    max_items_in_flight: int = Field(default=512, ge=1)
    min_items_in_flight: int = Field(default=1, ge=1)
    # With an SLO the bound starts here and grows while the teacher keeps within it (starting
    # at the maximum would fill the teacher's queue with seconds of work before the first slow
    # answer comes back).
    initial_items_in_flight: int = Field(default=32, ge=1)
    slo_s: float | None = Field(default=None, gt=0)
    backoff: float = Field(default=0.7, gt=0, lt=1)
    # The cascade accuracy (on the calibration table) below which items are not answered by
    # the student alone under load: their requests are shed (503 + Retry-After) instead.
    accuracy_floor: float | None = Field(default=None, ge=0, le=1)
    # Teacher latencies kept for its p95 (the deadline check).
    latency_window: int = Field(default=500, ge=10)

    @model_validator(mode="after")
    def _bounds(self) -> LoadConfig:
        if self.min_items_in_flight > self.max_items_in_flight:
            raise ValueError("min_items_in_flight must not exceed max_items_in_flight")
        return self


class ShadowConfig(BaseModel):
    """Shadow samples: student answers also sent to the teacher, off the response path."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # Share of student-answered items shadowed (0: off).
    fraction: float = Field(default=0.0, ge=0, le=1)
    # Margin strata (equal width over [0, 1]) the estimates are computed by.
    strata: int = Field(default=10, ge=1, le=100)
    # Shadow calls in flight per cascade and worker; shadows wait in a bounded queue and are
    # dropped first (counted) when it is full or the teacher has no room to spare.
    max_in_flight: int = Field(default=2, ge=1)
    queue: int = Field(default=256, ge=1)
    batch: int = Field(default=32, ge=1)
    # Triton request priority for shadow calls (the teacher's config needs priority_levels);
    # None: the default priority.
    priority: int | None = Field(default=None, ge=1)


class OverridesConfig(BaseModel):
    """What a request may ask for itself: CASCADE_OVERRIDES__*. Off unless enabled."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    enabled: bool = False
    # `delegate: never` / `delegate: always` allowed.
    allow_never: bool = True
    allow_always: bool = False
    # A request's own threshold must lie within these.
    min_threshold: float = Field(default=0.0, ge=0, le=1)
    max_threshold: float = Field(default=1.0, ge=0, le=1)
    # The longest `deadline_ms` a request may give (deadlines are always allowed when enabled).
    max_deadline_ms: int = Field(default=60_000, ge=1)
