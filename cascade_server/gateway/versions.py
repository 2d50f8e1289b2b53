"""Which student version a cascade serves, and changing it without dropping requests.

`swap` loads a bundle beside the served version (off the event loop), warms it, records the
choice in the control store, and only then flips: a failed write changes nothing anywhere.
`follow` serves what the store records (a version rolled out through another worker or replica,
or before a restart); a recorded version that cannot be loaded (its bundle deleted, say) is
reported in `follow_error` (readiness details) and the configured one keeps serving. Both run
under one lock, so two loads never race and the rollback target is always the version that was
really served before. The flip itself is one assignment between two batches; the old version is
retired when the requests that started on it are answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from ..bundle import Bundle
from ..config.cascade import CascadeConfig
from ..errors import InvalidInput
from .metrics import Metrics
from .rollout import RolloutState, RolloutStore
from .stores import ControlStore, now
from .student import Student
from .supervise import BurstLog
from .version import StudentVersion

log = logging.getLogger(__name__)
_MESSAGE_CHARS = 400  # of a loader's own error, quoted in the 422


class VersionManager:
    def __init__(
        self,
        bundle: Bundle,
        config: CascadeConfig,
        store: ControlStore,
        metrics: Metrics,
        student: Student | None = None,
        on_flip: Callable[[], object] | None = None,
        prepare: Callable[[StudentVersion], Awaitable[None]] | None = None,
    ) -> None:
        self.name = bundle.manifest.name
        self.config = config
        self.store = store
        self.metrics = metrics
        self.active = StudentVersion(bundle, config, store, student)
        self.rollout = RolloutStore(store, self.name)
        self.follow_error: str | None = None
        self._on_flip = on_flip
        self._prepare = prepare  # what a version needs beyond itself (its tiers on Triton)
        self._lock = asyncio.Lock()
        self._follow_failures = BurstLog(every_s=60.0, logger=log)
        # The recorded state that failed to load, and when to try it again: not every watch
        # interval (an ONNX session and a warm-up on every worker), but after a backoff that
        # doubles to a minute (a bundle copied to this replica late is followed), or at once
        # when the record changes.
        self._failed: tuple[str, str] | None = None
        self._retry_at = 0.0
        self._retry_s = 0.0

    def setup(self) -> None:
        self.active.setup()
        self.metrics.student_version(self.name, None, self.active.version)

    def close(self) -> None:
        self.active.close()

    async def follow(self) -> None:
        """Serve the version the control store records, if it is not the one served."""
        async with self._lock:
            state = self.rollout.read()
            if state is None or Path(state.bundle) == self.active.bundle.path:
                self.follow_error = None
                self._failed = None
                return
            record = (state.updated_at, state.bundle)
            clock = time.monotonic()
            if record == self._failed and clock < self._retry_at:
                return  # still the record that could not be loaded: follow_error says so
            try:
                new = await self._load(Path(state.bundle))
            except InvalidInput as exc:
                self._retry_s = min(self._retry_s * 2, 60.0) if record == self._failed else 2.0
                self._failed, self._retry_at = record, clock + self._retry_s
                self.follow_error = (
                    f"the recorded student {state.version} ({state.bundle}) cannot be followed; "
                    f"serving {self.active.version}: {exc.message}"
                )
                self._follow_failures("cascade %s: %s", self.name, self.follow_error)
                return
            self._failed = None
            self.follow_error = None
            log.warning("cascade %s: following rollout to %s", self.name, state.bundle)
            self._flip(new)

    async def swap(self, bundle: str, actor: str) -> tuple[RolloutState, bool]:
        """Serve the bundle at `bundle`; (the recorded state, whether anything changed). The
        bundle already served is not loaded twice, and rollback keeps its way back."""
        path = _resolve(bundle)
        async with self._lock:
            recorded = self.rollout.read()
            if path == self.active.bundle.path and self._same_version_on_disk(path):
                state = recorded or RolloutState(
                    bundle=str(path),
                    version=self.active.version,
                    previous=None,
                    updated_at=now(),
                    updated_by=actor,
                )
                return state, False
            if path == self.active.bundle.path:  # the same directory, a new version in it
                previous = recorded.previous if recorded else None
            else:
                previous = str(self.active.bundle.path)
            new = await self._load(path)
            try:
                state = await self.rollout.write(path, previous, new.version, actor)
            except BaseException:
                new.close()  # recorded nowhere: nothing changes, here or elsewhere
                raise
            self._flip(new)
            return state, True

    async def rollback(self, actor: str) -> RolloutState:
        """Back to the version before the last swap."""
        state = self.rollout.read()
        if state is None or state.previous is None:
            raise InvalidInput(f"cascade {self.name!r} has no previous student version")
        new_state, _ = await self.swap(state.previous, actor)
        return new_state

    def _same_version_on_disk(self, path: Path) -> bool:
        try:
            return Bundle.load(path).manifest.version == self.active.version
        except (OSError, ValueError):
            return False

    async def _load(self, path: Path) -> StudentVersion:
        """A new version, loaded, checked against the served one and warmed, on a thread. Any
        failure of the loaders (ONNX Runtime's, tokenizers', the manifest's) is the bundle's
        fault: 422 naming it, and the served version stays."""
        active = self.active

        def load() -> StudentVersion:
            version = StudentVersion(Bundle.load(path), self.config, self.store)
            try:
                version.check_replaces(active)
                version.setup()
            except BaseException:
                version.close()
                raise
            return version

        try:
            version = await asyncio.to_thread(load)
            if self._prepare is not None:
                try:
                    await self._prepare(version)
                except BaseException:
                    version.close()
                    raise
            return version
        except InvalidInput:
            raise
        except Exception as exc:
            log.warning("cascade %s: bundle %s cannot be loaded", self.name, path, exc_info=True)
            detail = f"{type(exc).__name__}: {exc}"
            if len(detail) > _MESSAGE_CHARS:
                detail = detail[:_MESSAGE_CHARS] + "..."
            raise InvalidInput(f"bundle {path} cannot be loaded: {detail}") from None

    def _flip(self, new: StudentVersion) -> None:
        old, self.active = self.active, new  # the flip: one assignment, between two batches
        self.metrics.student_version(self.name, old.version, new.version)
        if self._on_flip is not None:
            self._on_flip()
        log.warning("cascade %s: student %s -> %s", self.name, old.version, new.version)
        old.retired = True
        if old.in_flight == 0:
            old.close()


def _resolve(bundle: str) -> Path:
    try:
        return Path(bundle).resolve()
    except (OSError, ValueError) as exc:  # a NUL byte, a loop of links
        raise InvalidInput(f"bundle {bundle!r} cannot be loaded: {exc}") from None
