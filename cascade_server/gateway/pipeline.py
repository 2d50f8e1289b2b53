"""The per-batch path, as named steps: student -> decide -> route -> answer now, and the teacher
in the background for what was sent.

One micro-batch is one student call, one routing decision per item (routing.py), and at most one
teacher call carrying every sent item of every request in the batch. Requests with nothing sent
are answered at once; the others when the teacher has answered. Answers are identical whether a
request was batched with others or alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from ..errors import Overloaded
from ..policy import Decision, class_probabilities, decide, top2_margin
from ..preprocess import Batch
from .answers import Answer
from .batcher import Job
from .breaker import Ticket
from .cache import ResponseCache
from .capture import Capture
from .delegation import Done, TeacherStage
from .hops import RemoteTiers
from .keeper import Keeper, Kept
from .metrics import Metrics
from .options import RequestOptions
from .outcomes import BY_TEACHER, Outcome
from .routing import Load, Mode, Routes, route
from .shadow import Shadow
from .supervise import BurstLog
from .tiers import ChainResult
from .tracing import RequestTrace, Tracing
from .version import StudentVersion

log = logging.getLogger(__name__)
_AUTO, _ALWAYS = int(Mode.AUTO), int(Mode.ALWAYS)  # plain ints: enum lookups cost per batch
_FAILED, _DEADLINE = int(Outcome.TEACHER_FAILED), int(Outcome.DEADLINE)
_BUSY, _CONFIDENT = int(Outcome.TEACHER_BUSY), int(Outcome.CONFIDENT)
_FORCED_TEACHER = int(Outcome.FORCED_TEACHER)


@dataclass(frozen=True)
class Work:
    """What a request hands the micro-batcher: its preprocessed inputs, on the version it
    started with, its own options (when it asked for any) and its trace (when traced)."""

    version: StudentVersion
    batch: Batch
    trace: RequestTrace | None = None
    options: RequestOptions | None = None


BatchJob = Job[Work, Answer]


class BatchObserver(Protocol):
    """Who watches the batches (the live window, shadow sampling). Never fails a request:
    the path calls it through `_observe`, which logs and drops errors."""

    def routed(self, margins: np.ndarray, delegated: int, forced: int) -> None: ...
    def answered(self, student_margins: np.ndarray, teacher_items: int) -> None: ...
    def answered_by(self, counts: np.ndarray) -> None: ...


class BatchPath:
    def __init__(
        self,
        cascade: str,
        n_classes: int,
        teacher: TeacherStage,
        metrics: Metrics,
        threshold: Callable[[StudentVersion], float],
        retry_after_s: int = 1,
        tracing: Tracing | None = None,
        observer: BatchObserver | None = None,
        shadow: Shadow | None = None,
        accuracy_floor: float | None = None,
        cache: ResponseCache | None = None,
        capture: Capture | None = None,
        remote: RemoteTiers | None = None,
        tier_thresholds: Callable[[StudentVersion], tuple[float, ...]] | None = None,
    ) -> None:
        self.tracing = tracing
        self.remote = remote
        # The tiers' thresholds in force per version (the controller's under a cost budget).
        self.tier_thresholds = tier_thresholds or StudentVersion.tier_thresholds
        self.cascade = cascade
        self.n_classes = n_classes
        self.teacher = teacher
        self.metrics = metrics
        self.threshold = threshold
        self.retry_after_s = retry_after_s
        self.observer = observer
        self.shadow = shadow
        self.accuracy_floor = accuracy_floor
        self.keeper = Keeper(cache, capture)
        self._floors: dict[StudentVersion, float] = {}  # the floor as a threshold, per version
        self._observer_failures = BurstLog(logger=log)

    def __call__(self, jobs: list[BatchJob]) -> None:
        """Jobs by student version (one group, except around a swap). A job whose request is
        gone (cancelled while it queued) is dropped: nobody waits for it, and its version may be
        retired already."""
        live = [job for job in jobs if not job.future.done()]
        if not live:
            return
        first = live[0].payload.version
        if all(job.payload.version is first for job in live):
            self._run(first, live)
            return
        groups: dict[int, list[BatchJob]] = {}
        for job in live:
            groups.setdefault(id(job.payload.version), []).append(job)
        for group in groups.values():
            try:
                self._run(group[0].payload.version, group)
            except Exception as exc:  # one version's failure is its own requests' 500 only
                log.exception("cascade %s: a batch failed", self.cascade)
                for job in group:
                    if not job.future.done():
                        job.future.set_exception(exc)

    def _run(self, version: StudentVersion, jobs: list[BatchJob]) -> None:
        started = asyncio.get_running_loop().time()
        waits = [started - job.queued_at for job in jobs]
        payloads = [job.payload for job in jobs]
        batch = Batch.concat([w.batch for w in payloads])
        n = len(batch)
        starts = np.cumsum([0] + [job.size for job in jobs])
        # Step 1: the student (what the response cache does not hold already).
        keys = self.keeper.keys(batch)
        t0, t0_ns = time.perf_counter(), time.time_ns()
        logits = self.keeper.student(version, batch, keys)
        student_s = time.perf_counter() - t0
        tracing = self.tracing is not None and self.tracing.enabled
        traced = [w.trace for w in payloads if w.trace is not None] if tracing else None
        if traced:
            end_ns = time.time_ns()
            for trace in traced:
                trace.stage("queue", trace.marks["preprocessed"], t0_ns)
                trace.stage("student", t0_ns, end_ns, batch_items=n)
        # Step 2: what the policy wants (margin against the threshold, or the request's own;
        # delegating classes), and the requests' own options.
        threshold = self.threshold(version)
        asked = any([w.options is not None for w in payloads])
        items = _ItemOptions.of(jobs, starts, threshold, n) if asked else None
        decision = decide(logits, threshold if items is None else items.threshold, **version.policy)
        probs = class_probabilities(decision.probs, version.manifest.output_classes, self.n_classes)
        if probs is decision.probs:
            probs = probs.copy()  # teacher rows are written into it
        self.metrics.student_batch(self.cascade, decision.margins, student_s)
        # Step 2b (N-stage cascades): the tiers, each on what was left unsure before it.
        chain = None
        if version.tiers or version.remote:
            chain = self._tiers(version, batch, logits, decision, items, probs)
        # Where what is left unsure goes first: the teacher, or the first tier on Triton.
        hop = self.teacher if not version.remote else self._remote_stage(version, 0)
        # Step 3: one routing decision per item, against the teacher's load now. From here
        # the breaker's ticket is this batch's until a teacher call holds it.
        ticket = None
        try:
            routes, refused, ticket = self._route(
                version, decision, items, starts, len(jobs), chain, hop
            )
            shown = threshold if items is None else items.threshold
            answer = Answer(probs, decision.margins, routes.outcome, shown, student_s)
            if chain is not None:
                answer.stage, answer.stage_names = chain.stage, version.stage_names
                answer.tiers_s = sum(chain.seconds)
            if keys is not None and routes.send.size:  # teacher answers held by the cache
                held = self.keeper.teacher_hits(version, routes, answer, keys)
                if held:
                    self._observe("answered", answer.margins[:0], held)
            sent = routes.send
            if not sent.size:
                hop.release(ticket)
                ticket = None
            kept = self._account(version, decision, routes, refused, items, n, answer)
            # Step 4: answer what is decided; refuse what the accuracy floor does not allow.
            waiting = _jobs_holding(starts, sent, len(jobs))
            if refused is not None:
                self._refuse(jobs, starts, refused)
            _resolve(jobs, answer, starts, waits, ~waiting)
            if self.shadow is not None:  # after the answers: a sample never delays one
                self._offer(version, batch, decision.margins, kept, probs, answer.stage)
            if not sent.size:
                return
            # Step 5: the teacher (or the first tier on Triton), in the background, for what
            # was sent.
            pending = None
            if version.remote:
                pending = np.zeros(n, dtype=bool)
                pending[sent] = True
            if items is not None and np.isfinite(items.deadline).any():
                self._fall_back_at_deadlines(
                    jobs, answer, starts, waits, waiting, sent, items, pending
                )
            f = _Flight(
                jobs, answer, starts, waits, version, items, batch, decision.margins, keys, pending
            )
            if version.remote:
                handed, ticket = ticket, None  # the first hop's from here
                self._first_hop(f, sent, hop, handed)
                return
            feeds, headers, done = self._teacher_call(f, waiting, sent)
        except BaseException:
            hop.release(ticket)  # no call holds it: a half-open probe slot comes back
            raise
        assert ticket is not None  # items are sent only with a ticket
        hop.call(feeds, sent.size, ticket, done, headers)

    def _route(
        self,
        version: StudentVersion,
        decision: Decision,
        items: _ItemOptions | None,
        starts: np.ndarray,
        n_jobs: int,
        chain: ChainResult | None = None,
        hop: TeacherStage | None = None,
    ) -> tuple[Routes, np.ndarray | None, Ticket | None]:
        """(the routes, the items of requests refused by the accuracy floor or None, the
        breaker's ticket). A refused request's items are not sent: the teacher's room, scarce
        just then, goes to the requests that will be answered. With tiers, the teacher is
        wanted for what the last tier left unsure, least sure (by its margin) first. `hop`:
        where those go (the teacher, or the first tier on Triton)."""
        hop = hop or self.teacher
        delegate, margins = decision.delegate, decision.margins
        if chain is not None:
            delegate, margins = chain.unsure, chain.margins
        wanted = delegate
        if items is not None:
            wanted = wanted | (items.mode == _ALWAYS)
        if wanted.any():
            # The p95 is for deadlines only: not computed for batches that have none.
            load, ticket = hop.load(with_p95=items is not None)
            if self.accuracy_floor is not None:
                load = replace(load, floor_threshold=self._floor(version))
        else:
            load, ticket = Load(), None
        # With tiers on Triton, `delegate: always` rows skip them: they are routed against the
        # teacher's own room where they are sent on (_first_hop), not against the first tier's
        # (whose open circuit would otherwise answer them `circuit_open`).
        always = None
        if hop is not self.teacher and items is not None and (items.mode == _ALWAYS).any():
            always = items.mode == _ALWAYS
        try:
            mode = None if items is None else items.mode
            budget = None if items is None else items.budget(time.perf_counter())
            routes = route(margins, delegate, load, mode=mode, budget_s=budget, exclude=always)
            if not routes.shed.any():
                return _with(routes, always), None, ticket
            shed_jobs = _jobs_holding(starts, np.flatnonzero(routes.shed), n_jobs)
            refused = np.repeat(shed_jobs, np.diff(starts))
            # The same room without the refused items: whatever was sent stays sent, and kept
            # items of answered requests may take the room freed (none falls below the floor:
            # its request would have been refused above).
            routes = route(
                margins,
                delegate,
                load,
                mode=mode,
                budget_s=budget,
                exclude=refused if always is None else refused | always,
            )
            return _with(routes, always & ~refused if always is not None else None), refused, ticket
        except BaseException:
            hop.release(ticket)  # not returned to `_run`: released here
            raise

    def _account(
        self,
        version: StudentVersion,
        decision: Decision,
        routes: Routes,
        refused: np.ndarray | None,
        items: _ItemOptions | None,
        n: int,
        answer: Answer,
    ) -> np.ndarray:
        """Metrics and the live window for the items answered now (refused requests' items
        are in neither: they were not served); returns which are answered without the
        teacher (by the student, or a tier in the gateway)."""
        settled = np.ones(n, dtype=bool)
        settled[routes.send] = False
        kept = None if refused is None else ~refused
        if kept is not None:
            settled &= kept
        self.metrics.items(self.cascade, routes.outcome[settled])
        self._answered_by(answer, answer.stages()[settled])
        served = n if kept is None else int(kept.sum())
        if version.remote:  # items sent on are counted where they settle (_settle)
            self._savings(version, served - int(routes.send.size), 0)
        else:
            self._savings(version, served, int(routes.send.size))
        # What the policy routed: not forced by a request, not refused.
        routed = None if items is None else items.mode == _AUTO
        if kept is not None:
            routed = kept if routed is None else routed & kept
        forced = decision.forced
        if forced.any():
            by_threshold = ~forced if routed is None else routed & ~forced
            n_forced = int(forced.sum() if routed is None else (forced & routed).sum())
        else:
            by_threshold, n_forced = routed, 0
        margins = decision.margins if by_threshold is None else decision.margins[by_threshold]
        delegated = decision.delegate if routed is None else decision.delegate[routed]
        self._observe("routed", margins, int(delegated.sum()), n_forced)
        kept_here: np.ndarray = settled & ~BY_TEACHER[routes.outcome]
        # A tier's answer is not the student's.
        by_student = kept_here if answer.stage is None else kept_here & (answer.stage == 0)
        self._observe("answered", decision.margins[by_student], 0)
        return kept_here

    def _savings(self, version: StudentVersion, items: int, to_teacher: int) -> None:
        calibration = version.manifest.calibration
        self.metrics.savings(
            self.cascade, items, to_teacher, calibration.cost_student, calibration.cost_teacher
        )

    def _refuse(self, jobs: list[BatchJob], starts: np.ndarray, refused: np.ndarray) -> None:
        for j in np.flatnonzero(_jobs_holding(starts, np.flatnonzero(refused), len(jobs))):
            if not jobs[j].future.done():
                jobs[j].future.set_exception(
                    Overloaded(
                        "the teacher is saturated and this input is below the cascade's "
                        f"accuracy floor; retry after {self.retry_after_s}s",
                        self.retry_after_s,
                    )
                )

    def _teacher_call(
        self, f: _Flight, waiting: np.ndarray, sent: np.ndarray
    ) -> tuple[dict[str, np.ndarray], dict[str, str] | None, Done]:
        """The feeds, trace headers and done callback of a teacher call for `sent`."""
        taken = f.batch.take(sent)
        spans, headers = self._teacher_spans(f.jobs, waiting, sent.size)
        keep = self.keeper.kept(taken, f.answer, sent, f.keys)
        done = self._done(f, waiting, sent, spans, keep)
        return f.version.teacher_feeds(taken), headers, done

    def _done(
        self, f: _Flight, waiting: np.ndarray, sent: np.ndarray, spans: list[Any], keep: Kept
    ) -> Done:
        """What answers the waiting requests when the teacher call ends (with tiers on Triton,
        those with no row still pending elsewhere). Whatever happens in it, no waiting request
        is left without an answer."""
        called = time.perf_counter()
        jobs, answer, starts, waits = f.jobs, f.answer, f.starts, f.waits
        margins, version = f.margins, f.version

        def done(
            teacher_probs: np.ndarray | None, error: str | None, exc: Exception | None
        ) -> None:
            try:
                answer.teacher_s = time.perf_counter() - called
                _end_spans(spans, error)
                if exc is None:
                    if teacher_probs is None:
                        _unanswered(answer.outcome, sent, error)
                        self._observe("answered", margins[_student_rows(answer, sent)], 0)
                    else:
                        # Rows answered by the student at their deadline stay the student's.
                        late = answer.outcome[sent] == _DEADLINE
                        answer.probs[sent[~late]] = teacher_probs[~late]
                        if answer.stage is not None:
                            answer.stage[sent[~late]] = len(answer.stage_names) - 1
                        late_rows = _student_rows(answer, sent[late])
                        self._observe("answered", margins[late_rows], int((~late).sum()))
                        self.keeper.keep(version, keep, ~late, teacher_probs, margins[sent])
                    self.metrics.items(self.cascade, answer.outcome[sent])
                    self._answered_by(answer, answer.stages()[sent])
                    if f.pending is not None:
                        self._settled(f, sent, waiting)
                    else:
                        _resolve(jobs, answer, starts, waits, waiting)
                    return
            except Exception as bug:
                log.exception("cascade %s: answering a teacher call failed", self.cascade)
                exc = bug
            _fail(jobs, waiting, exc)

        return done

    def _fall_back_at_deadlines(
        self,
        jobs: list[BatchJob],
        answer: Answer,
        starts: np.ndarray,
        waits: list[float],
        waiting: np.ndarray,
        sent: np.ndarray,
        items: _ItemOptions,
        pending: np.ndarray | None = None,
    ) -> None:
        """A request with a deadline still waiting on the teacher when it passes is answered
        then by the student (outcome `deadline`): the call goes on for the others. With tiers
        on Triton, only its rows still `pending` (not settled at a tier) are late."""
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        for j in np.flatnonzero(waiting):
            a, b = int(starts[j]), int(starts[j + 1])
            deadline = float(items.deadline[a])
            if not np.isfinite(deadline):
                continue
            job = jobs[j]
            rows = sent[(sent >= a) & (sent < b)]

            def fall_back(
                job: BatchJob = job, a: int = a, b: int = b, rows: np.ndarray = rows, j: int = j
            ) -> None:
                if job.future.done():
                    return
                answer.outcome[rows if pending is None else rows[pending[rows]]] = _DEADLINE
                mine = answer.rows(a, b, waits[j])
                # Its own copy: the teacher's answer, when it comes, is written into the batch's.
                mine.probs, mine.outcome = mine.probs.copy(), mine.outcome.copy()
                job.future.set_result(mine)

            handle = loop.call_later(max(deadline - now, 0.0), fall_back)
            job.future.add_done_callback(lambda _f, h=handle: h.cancel())

    def _tiers(
        self,
        version: StudentVersion,
        batch: Batch,
        logits: np.ndarray,
        decision: Decision,
        items: _ItemOptions | None,
        probs: np.ndarray,
    ) -> ChainResult:
        """The tiers on what the student left unsure, for requests the policy routes (a
        request's `delegate: always` goes straight to the teacher, `never` stays with the
        student)."""
        unsure = decision.delegate if items is None else decision.delegate & (items.mode == _AUTO)
        thresholds = self.tier_thresholds(version)[: len(version.tiers)]  # the local ones
        chain = version.tiers.run(
            batch.tensors, logits, decision.margins, unsure, probs, thresholds
        )
        tiers = version.tiers
        self.metrics.tier_calls(self.cascade, tiers.names, chain.ran, chain.seconds, tiers.costs)
        return chain

    # Tiers on Triton (hops.py): after the first hop, each call's done decides again and sends
    # what its tier left unsure on to the next stage; requests are answered as their rows settle.
    def _remote_stage(self, version: StudentVersion, i: int) -> TeacherStage:
        if i >= len(version.remote):
            return self.teacher
        assert self.remote is not None  # versions with Triton tiers load only with one
        return self.remote.stage(version.remote[i])

    def _tier_call(
        self,
        f: _Flight,
        i: int,
        waiting: np.ndarray,
        sent: np.ndarray,
        taken: dict[str, np.ndarray],
    ) -> tuple[dict[str, np.ndarray], dict[str, str] | None, Done]:
        """The feeds, trace headers and done callback of a call to Triton tier `i`."""
        ref = f.version.remote[i]
        assert ref.model is not None
        feeds = f.version.teacher_feeds(taken, ref.model)
        spans, headers = self._teacher_spans(f.jobs, waiting, sent.size, ref.name)
        return feeds, headers, self._tier_done(f, i, waiting, sent, spans)

    def _tier_done(
        self, f: _Flight, i: int, waiting: np.ndarray, sent: np.ndarray, spans: list[Any]
    ) -> Done:
        """When Triton tier `i` answers: its answer for the rows it is sure of (outcome
        confident: the teacher was not needed), the rest sent on; a failed or cancelled call
        leaves the rows the answer of the stage before (degraded or busy, as the teacher's).
        Whatever happens, no waiting request is left without an answer."""
        called = time.perf_counter()
        stage = 1 + len(f.version.tiers) + i

        def done(probs: np.ndarray | None, error: str | None, exc: Exception | None) -> None:
            a = f.answer
            try:
                a.tiers_s += time.perf_counter() - called
                _end_spans(spans, error)
                if exc is None:
                    late = a.outcome[sent] == _DEADLINE
                    onward = sent[:0]
                    if probs is None:
                        _unanswered(a.outcome, sent, error)
                    else:
                        rows, probs = sent[~late], probs[~late]
                        a.probs[rows] = probs
                        assert a.stage is not None
                        a.stage[rows] = stage
                        margins = top2_margin(probs)
                        threshold = self.tier_thresholds(f.version)[stage - 1]
                        unsure = margins < threshold
                        a.outcome[rows[~unsure]] = _CONFIDENT
                        onward = self._forward(f, i + 1, rows[unsure], margins[unsure])
                    settled = np.setdiff1d(sent, onward, assume_unique=True)
                    self._settle(f, settled)
                    self._settled(f, settled, waiting)
                    if probs is not None and self.shadow is not None:
                        # After the answers: the rows the tier's answer stays with (sure, or
                        # not sent on: busy, circuit open, deadline), for its live agreement.
                        mine = np.zeros(len(a.outcome), dtype=bool)
                        mine[np.setdiff1d(rows, onward, assume_unique=True)] = True
                        self._offer(f.version, f.batch, f.margins, mine, a.probs, a.stage)
                    return
            except Exception as bug:
                log.exception("cascade %s: answering a tier call failed", self.cascade)
                exc = bug
            _fail(f.jobs, waiting, exc)

        return done

    def _forward(self, f: _Flight, i: int, rows: np.ndarray, margins: np.ndarray) -> np.ndarray:
        """Routes `rows` (left unsure by the tier before) to hop `i` against its load now (the
        least sure first; the rest keep the answer they hold, outcome busy, circuit_open or
        deadline) and calls it; returns the rows sent."""
        if not rows.size:
            return rows
        stage = self._remote_stage(f.version, i)
        items = f.items
        load, ticket = stage.load(with_p95=items is not None)
        try:
            mode = None if items is None else items.mode[rows]
            budget = None if items is None else items.budget(time.perf_counter())[rows]
            routes = route(margins, np.ones(rows.size, bool), load, mode=mode, budget_s=budget)
            f.answer.outcome[rows] = routes.outcome
            sent: np.ndarray = rows[routes.send]
            if not sent.size:
                stage.release(ticket)
                return sent
            waiting = _jobs_holding(f.starts, sent, len(f.jobs))
            if stage is self.teacher:
                self._savings(f.version, int(sent.size), int(sent.size))
                feeds, headers, done = self._teacher_call(f, waiting, sent)
            else:
                feeds, headers, done = self._tier_call(f, i, waiting, sent, f.batch.take(sent))
        except BaseException:
            stage.release(ticket)
            raise
        assert ticket is not None
        stage.call(feeds, sent.size, ticket, done, headers)
        return sent

    def _first_hop(
        self, f: _Flight, sent: np.ndarray, hop: TeacherStage, ticket: Ticket | None
    ) -> None:
        """What the gateway's stages left unsure to the first Triton tier (with `ticket`, its
        breaker's); `delegate: always` items straight to the teacher, against its own room."""
        forced = f.answer.outcome[sent] == _FORCED_TEACHER
        rows = sent[~forced] if forced.any() else sent
        try:
            if rows.size:
                waiting = _jobs_holding(f.starts, rows, len(f.jobs))
                call = self._tier_call(f, 0, waiting, rows, f.batch.take(rows))
            else:
                hop.release(ticket)
                ticket = None
        except BaseException:
            hop.release(ticket)
            raise
        if ticket is not None:
            feeds, headers, done = call
            hop.call(feeds, rows.size, ticket, done, headers)
        if forced.any():
            always = sent[forced]
            onward = self._forward(f, len(f.version.remote), always, f.margins[always])
            settled = np.setdiff1d(always, onward, assume_unique=True)
            self._settle(f, settled)
            self._settled(f, settled, _jobs_holding(f.starts, settled, len(f.jobs)))

    def _settled(self, f: _Flight, rows: np.ndarray, waiting: np.ndarray) -> None:
        """`rows` are no longer pending: the `waiting` requests with none left are answered."""
        assert f.pending is not None  # a flight through Triton tiers
        f.pending[rows] = False
        still = _jobs_holding(f.starts, np.flatnonzero(f.pending), len(f.jobs))
        _resolve(f.jobs, f.answer, f.starts, f.waits, waiting & ~still)

    def _settle(self, f: _Flight, rows: np.ndarray) -> None:
        """Metrics for rows answered at a Triton tier (by it, or by the stage before it)."""
        if not rows.size:
            return
        outcome, a = f.answer.outcome[rows], f.answer
        self.metrics.items(self.cascade, outcome)
        self._answered_by(a, a.stages()[rows])
        self._savings(f.version, int(rows.size), 0)
        assert a.stage is not None
        self._observe("answered", f.margins[rows[a.stage[rows] == 0]], 0)

    def _answered_by(self, answer: Answer, stages: np.ndarray) -> None:
        """Items answered per stage: the metrics, and the live window (the live cost)."""
        if not len(stages):
            return
        counts = np.bincount(stages, minlength=len(answer.stage_names))
        self.metrics.answered_by(self.cascade, answer.stage_names, counts)
        if self.observer is not None:
            self._observe("answered_by", counts)

    def _observe(self, what: str, margins: np.ndarray, *counts: int) -> None:
        if self.observer is None:
            return
        try:
            getattr(self.observer, what)(margins, *counts)
        except Exception as exc:  # an observer never fails a request
            self._observer_failures("cascade %s: observer failed: %r", self.cascade, exc)

    def _offer(
        self,
        version: StudentVersion,
        batch: Batch,
        margins: np.ndarray,
        answered: np.ndarray,
        probs: np.ndarray,
        stages: np.ndarray | None,
    ) -> None:
        assert self.shadow is not None
        try:
            self.shadow.offer(version, batch, margins, answered, probs, stages)
        except Exception as exc:  # shadow sampling never fails a request
            self._observer_failures("cascade %s: shadow sampling failed: %r", self.cascade, exc)

    def _floor(self, version: StudentVersion) -> float:
        """The accuracy floor as a threshold for this version: items below it are not left to
        the student alone under load."""
        value = self._floors.get(version)
        if value is None:
            assert self.accuracy_floor is not None
            try:
                value = version.manifest.calibration.threshold_for_accuracy(self.accuracy_floor)
            except ValueError:  # the calibration never reaches it: every delegated item counts
                value = 1.0
            self._floors = {version: value}  # one version at a time (two around a swap)
        return value

    def _teacher_spans(
        self, jobs: list[BatchJob], waiting: np.ndarray, n: int, stage: str = "teacher"
    ) -> tuple[list[Any], dict[str, str] | None]:
        """A live span of the call (the teacher's, or a Triton tier's) for each traced request
        waiting on it; the first one's context goes to Triton."""
        traces = [jobs[j].payload.trace for j in np.flatnonzero(waiting)]
        spans = [t.start_stage(stage, batch_items=n) for t in traces if t is not None]
        if not spans or self.tracing is None:
            return spans, None
        return spans, self.tracing.headers_for(spans[0])


@dataclass(frozen=True)
class _Flight:
    """A batch's state while its rows are with the teacher, or travel the stages on Triton."""

    jobs: list[BatchJob]
    answer: Answer
    starts: np.ndarray
    waits: list[float]
    version: StudentVersion
    items: _ItemOptions | None
    batch: Batch
    margins: np.ndarray  # the student's
    keys: list[bytes] | None
    # (n,) bool: rows a Triton stage still has to answer; None: only the teacher is called.
    pending: np.ndarray | None


@dataclass
class _ItemOptions:
    """The requests' options spread over their items."""

    threshold: np.ndarray
    mode: np.ndarray
    deadline: np.ndarray  # perf_counter, inf: none

    @classmethod
    def of(cls, jobs: list[BatchJob], starts: np.ndarray, threshold: float, n: int) -> _ItemOptions:
        out = cls(np.full(n, threshold), np.zeros(n, np.int8), np.full(n, np.inf))
        for j, job in enumerate(jobs):
            opts = job.payload.options
            if opts is None:
                continue
            rows = slice(int(starts[j]), int(starts[j + 1]))
            if opts.threshold is not None:
                out.threshold[rows] = opts.threshold
            out.mode[rows] = opts.mode
            if opts.deadline is not None:
                out.deadline[rows] = opts.deadline
        return out

    def budget(self, now: float) -> np.ndarray:
        return self.deadline - now


def _with(routes: Routes, always: np.ndarray | None) -> Routes:
    """`routes` with the `always` rows sent too (routed further on, against the teacher's
    own room)."""
    if always is None or not always.any():
        return routes
    routes.outcome[always] = _FORCED_TEACHER  # not judged late on the tier's p95 either
    return replace(routes, send=np.union1d(routes.send, np.flatnonzero(always)))


def _student_rows(answer: Answer, rows: np.ndarray) -> np.ndarray:
    """Of `rows`, those holding the student's own answer (with tiers, a row left by the
    teacher holds the last tier's: not the student's, for the live window)."""
    return rows if answer.stage is None else rows[answer.stage[rows] == 0]


def _end_spans(spans: list[Any], error: str | None) -> None:
    for span in spans:
        span.set_attribute("cascade.teacher.error", error or "")
        span.end()


def _unanswered(outcome: np.ndarray, sent: np.ndarray, error: str | None) -> None:
    """A call that gave no answer: its rows keep the answer they hold. A cancelled call
    (shutdown) did not fail: not degraded, as when there is no room. Rows answered at their
    deadline stay so."""
    missing = _BUSY if error == "cancelled" else _FAILED
    outcome[sent] = np.where(outcome[sent] == _DEADLINE, _DEADLINE, missing)


def _fail(jobs: list[BatchJob], waiting: np.ndarray, exc: BaseException) -> None:
    """A bug answering a call: the requests still waiting on it answer 500, none is left."""
    for j in np.flatnonzero(waiting):
        if not jobs[j].future.done():
            jobs[j].future.set_exception(exc)


def _jobs_holding(starts: np.ndarray, items: np.ndarray, n_jobs: int) -> np.ndarray:
    """Which jobs hold at least one of `items` (indices into the batch)."""
    held = np.zeros(n_jobs, dtype=bool)
    if items.size:
        held[np.searchsorted(starts, items, side="right") - 1] = True
    return held


def _resolve(
    jobs: list[BatchJob],
    answer: Answer,
    starts: np.ndarray,
    waits: list[float],
    which: np.ndarray,
) -> None:
    """Hands each chosen job its rows of the batch's answer."""
    for j in np.flatnonzero(which):
        job = jobs[j]
        if not job.future.done():
            job.future.set_result(answer.rows(int(starts[j]), int(starts[j + 1]), waits[j]))
