"""The remote tiers of N-stage cascades: models on the teacher's Triton between the student and
the teacher (`runtime: triton` in the manifest), each called as the teacher is, through a
`TeacherStage` of its own (its breaker, in-flight bounds and AIMD limit), so a tier that fails
or saturates degrades its own items, never the teacher's room.

A stage is kept per tier name, model and cost: a student version that names the same tier reuses it
(its breaker state and limit carry over a swap), and a new one is set up before the version
serves. Stages live as long as the cascade.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..bundle import TeacherRef, TierRef
from ..config.delegation import LoadConfig
from ..config.teacher import TeacherConfig
from .delegation import TeacherStage
from .metrics import Metrics
from .teacher import Teacher

# A Triton client for a tier's model (the gateway's teacher URL and timeouts).
TierFactory = Callable[[TeacherRef], Teacher]


class TierMetrics:
    """What a tier's `TeacherStage` reports, under the tier's name (the teacher's own series
    stay the teacher's)."""

    def __init__(self, metrics: Metrics, tier: str, cost: float) -> None:
        self.metrics, self.tier, self.cost = metrics, tier, cost

    def circuit(self, cascade: str, state: int, name: str) -> None:
        self.metrics.tier_circuit(cascade, self.tier, state, name)

    def teacher_call(self, cascade: str, n: int, seconds: float, error: str | None) -> None:
        self.metrics.tier_calls(cascade, (self.tier,), [n], [seconds], (self.cost,))
        if error is not None:
            self.metrics.tier_error(cascade, self.tier, error)

    def teacher_limit(self, cascade: str, limit: float) -> None:
        self.metrics.tier_limit(cascade, self.tier, limit)


class RemoteTiers:
    def __init__(
        self,
        cascade: str,
        factory: TierFactory | None,
        config: TeacherConfig,
        load: LoadConfig,
        metrics: Metrics,
        n_classes: int,
    ) -> None:
        self.cascade = cascade
        self.factory = factory
        self.config = config
        self.load = load
        self.metrics = metrics
        self.n_classes = n_classes
        self._stages: dict[tuple[str, str, str, float], TeacherStage] = {}

    @staticmethod
    def _key(ref: TierRef) -> tuple[str, str, str, float]:
        # The cost too: a version that prices the same model differently counts its own.
        assert ref.model is not None
        return (ref.name, ref.model.model_name, ref.model.model_version, ref.cost)

    def stage(self, ref: TierRef) -> TeacherStage:
        """The tier's stage (set up by `prepare` before its version served)."""
        return self._stages[self._key(ref)]

    async def prepare(self, refs: tuple[TierRef, ...]) -> None:
        """Stages for the tiers not seen before, set up (a tier's model that is down is not
        fatal: its items are answered by the stage before it until it answers)."""
        new = []
        for ref in refs:
            key = self._key(ref)
            if key in self._stages:
                continue
            if self.factory is None:
                raise ValueError(f"tier {ref.name} runs on Triton; this gateway has no client")
            assert ref.model is not None
            stage = TeacherStage(
                self.cascade,
                self.factory(ref.model),
                self.config,
                TierMetrics(self.metrics, ref.name, ref.cost),
                self.n_classes,
                self.load,
            )
            self._stages[key] = stage
            new.append(stage)
            self.metrics.tier_circuit(self.cascade, ref.name, 0, "closed")  # the series exists
        await asyncio.gather(*(s.setup() for s in new))

    def readiness(self, refs: tuple[TierRef, ...]) -> dict[str, bool]:
        return {f"tier:{ref.name}": self.stage(ref).ready for ref in refs}

    async def check_ready(self) -> None:
        await asyncio.gather(*(s.check_ready() for s in self._stages.values()))

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self._stages.values()))
        self._stages.clear()
