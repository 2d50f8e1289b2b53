"""One cascade, for one bundle: its stages wired together.

A request's own task preprocesses its inputs (so bad input is refused before any model runs,
and one bad request never fails a batch it would have joined), then submits them to the
cascade's micro-batcher, whose batches run the per-batch path (pipeline.py). The student
versions (versions.py) and the teacher (delegation.py) are stages of their own; a supervised
background loop follows student versions rolled out elsewhere and checks the teacher.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..bundle import Bundle, Manifest
from ..config.cascade import CascadeConfig
from ..preprocess import Preprocessor
from .answers import Answer, Predictions
from .batcher import MicroBatcher
from .cache import ResponseCache
from .capture import Capture
from .control import ThresholdStore
from .controller import Controller
from .delegation import TeacherStage
from .hops import RemoteTiers, TierFactory
from .metrics import Metrics
from .options import RequestOptions
from .pipeline import BatchPath, Work
from .rollout import RolloutState
from .shadow import Shadow
from .stores import ControlStore
from .student import Student
from .supervise import Periodic
from .teacher import Teacher
from .tracing import RequestTrace, Tracing
from .version import StudentVersion
from .versions import VersionManager

log = logging.getLogger(__name__)


class Cascade:
    def __init__(
        self,
        bundle: Bundle,
        config: CascadeConfig,
        metrics: Metrics,
        teacher: Teacher,
        store: ControlStore,
        student: Student | None = None,
        retry_after_s: int = 1,
        tracing: Tracing | None = None,
        tiers: TierFactory | None = None,
    ) -> None:
        m = bundle.manifest
        self.config = config
        self.name = m.name
        self.modality = m.modality
        self.classes = m.classes
        self.metrics = metrics
        self.store = store
        self.remote = RemoteTiers(
            m.name, tiers, config.teacher, config.load, metrics, len(m.classes)
        )
        self.students = VersionManager(
            bundle, config, store, metrics, student, self._flipped, self._prepare
        )
        self.teacher = TeacherStage(
            m.name, teacher, config.teacher, metrics, len(m.classes), config.load
        )
        self.controller = Controller(
            m.name, config.controller, store, metrics, config.shadow.strata
        )
        self.shadow = Shadow(m.name, config.shadow, self.teacher, self.controller.window, metrics)
        self.controller.window.stratified = self.shadow.enabled
        self.controller.reset(self.active.version, len(self.active.stage_names))
        self.cache = ResponseCache(config.cache, metrics, m.name)
        self.capture = Capture(m.name, config.capture, metrics, m.modality, tuple(m.classes))
        self.shadow.capture = self.capture if self.capture.enabled else None
        self.path = BatchPath(
            m.name,
            len(m.classes),
            self.teacher,
            metrics,
            self._threshold_of,
            retry_after_s,
            tracing,
            observer=self.controller.window,
            shadow=self.shadow if self.shadow.enabled else None,
            accuracy_floor=config.load.accuracy_floor,
            cache=self.cache,
            capture=self.capture,
            remote=self.remote,
            tier_thresholds=self.tier_thresholds,
        )
        self.batcher: MicroBatcher[Work, Answer] = MicroBatcher(
            self.path, config.batching, name=f"{m.name}-batcher"
        )
        self._decoder = ThreadPoolExecutor(
            config.decode.decode_threads, thread_name_prefix=f"{m.name}-decode"
        )
        self._watch = Periodic(f"{m.name}-watch", config.watch_interval_s, self._watch_step)
        self._control = Periodic(
            f"{m.name}-controller", config.controller.interval_s, self._control_step
        )
        self._shown_threshold: tuple[float, str] | None = None
        self._shown_policy: object = None

    # The active version's parts, as the routes and admin see them.
    @property
    def active(self) -> StudentVersion:
        return self.students.active

    @property
    def bundle(self) -> Bundle:
        return self.active.bundle

    @property
    def manifest(self) -> Manifest:
        return self.active.manifest

    @property
    def versions(self) -> dict[str, str]:
        return self.active.versions

    @property
    def thresholds(self) -> ThresholdStore:
        return self.active.thresholds

    @property
    def student(self) -> Student:
        return self.active.student

    @property
    def preprocessor(self) -> Preprocessor:
        return self.active.preprocessor

    async def setup(self) -> None:
        # The state this replica serves from, read before it says it is ready (off the loop).
        await self.store.prime(
            [self.active.thresholds.key, self.students.rollout.key, self.controller.key]
        )
        self.students.setup()
        await self._prepare(self.active)
        await self.teacher.setup()
        self.metrics.prime(self.name, self.active.stage_names)
        self.threshold()
        self.batcher.start()
        self.capture.start()
        # A version rolled out earlier (through any worker) survives restarts; one that can no
        # longer be loaded is reported, and the configured bundle serves.
        await self.students.follow()
        if not self.teacher.ready:
            log.warning(
                "cascade %s: teacher %s is not ready yet", self.name, self.versions["teacher"]
            )
        self._watch.start()
        self._control.start()
        self.shadow.start()

    async def _watch_step(self) -> None:
        """Student versions rolled out through another worker, and the teacher's readiness
        (with the client's own timeout: probes read the cached answer, never the network)."""
        try:
            await self.students.follow()
        finally:
            await self.teacher.check_ready()
            await self.remote.check_ready()
            self.metrics.event_loop_tasks()  # every worker's count stays fresh between scrapes

    async def _control_step(self) -> None:
        """The live window published, estimates refreshed, an online policy held."""
        version = self.active
        m = version.manifest
        await self.controller.step(
            version.thresholds.current(),
            m.calibration,
            frontier=m.frontier or (None if m.tiers else m.calibration.frontier()),
            costs=version.costs,
        )

    async def close(self) -> None:
        await self._control.stop()
        await self.shadow.close()
        await self._watch.stop()
        await self.batcher.close()
        # The tiers on Triton before the teacher (a tier call ending now sends nothing on to a
        # closed teacher), and the capture last: what the last answers queued is written.
        await self.remote.close()
        await self.teacher.close()
        await self.capture.close()
        self.students.close()
        self._decoder.shutdown(wait=False, cancel_futures=True)

    def readiness(self) -> dict[str, bool]:
        """Cached: never waits on the network (see _watch_step)."""
        ready = {"student": self.active.student.ready, "teacher": self.teacher.ready}
        if self.active.remote:  # each tier on Triton, as `tier:<name>`
            ready |= self.remote.readiness(self.active.remote)
        return ready

    async def _prepare(self, version: StudentVersion) -> None:
        """A version's tiers on Triton, set up before it serves."""
        await self.remote.prepare(version.remote)

    def threshold(self) -> float:
        """The threshold in force for the active version (the controller's while it holds an
        online policy), shown in the metrics (written when it changes)."""
        policy = self.active.thresholds.current()
        value = self.controller.threshold_for(policy)
        shown = (value, self.active.version)
        # The store hands back one object per policy: identity is the cheap check.
        if shown != self._shown_threshold or policy is not self._shown_policy:
            self.metrics.set_threshold(self.name, value)
            self._shown_threshold, self._shown_policy = shown, policy
            # What the operator should see delegated: the target while one is held (the
            # threshold moves so the rate does not), else the calibration's rate there.
            target = policy.target if policy.mode == "target_delegation_rate" else None
            if target is None or not self.controller.config.enabled:
                target = self.active.manifest.calibration.rate_for_threshold(value)
            self.metrics.set_expected_delegation(self.name, target)
        return value

    def _flipped(self) -> None:
        """A new student version serves: its own live window, and its threshold shown."""
        self.controller.reset(self.active.version, len(self.active.stage_names))
        self.threshold()

    def tier_thresholds(self, version: StudentVersion | None = None) -> tuple[float, ...]:
        """The tiers' thresholds in force (the controller's while it holds a cost budget)."""
        version = version or self.active
        if version is not self.active:
            return version.tier_thresholds()  # a retiring version: its own policy
        return version.tier_thresholds(self.controller.tiers_for(version.thresholds.current()))

    def _threshold_of(self, version: StudentVersion) -> float:
        if version is self.active:
            return self.threshold()
        return version.threshold()  # a retiring version: its own policy, no controller

    async def swap(self, bundle: str, actor: str) -> tuple[RolloutState, bool]:
        return await self.students.swap(bundle, actor)

    async def rollback(self, actor: str) -> RolloutState:
        return await self.students.rollback(actor)

    async def predict(
        self,
        items: list[Any],
        trace: RequestTrace | None = None,
        options: RequestOptions | None = None,
    ) -> Predictions:
        """Answers every input, in order, on the version active when the request started. Bad
        input raises before any model runs."""
        version = self.active
        version.in_flight += 1
        try:
            t0 = time.perf_counter()
            plan = version.preprocessor.plan(items)  # every limit checked, nothing decoded
            if plan.inline:
                batch = plan.run()
            else:
                loop = asyncio.get_running_loop()
                batch = await loop.run_in_executor(self._decoder, plan.run)
            preprocess_s = time.perf_counter() - t0
            work = Work(version, batch, None, options)
            if trace is not None:
                trace.stage("parse", trace.marks["arrived"], trace.marks["parsed"])
                trace.mark("preprocessed")
                trace.stage(
                    "preprocess",
                    trace.marks["parsed"],
                    trace.marks["preprocessed"],
                    inline=plan.inline,
                )
                work = Work(version, batch, trace, options)
            answer = await self.batcher.submit(work, len(batch))
            return Predictions(
                self.name, self.classes, version, answer, batch.truncated, preprocess_s
            )
        finally:
            version.in_flight -= 1
            if version.retired and version.in_flight == 0:
                version.close()
