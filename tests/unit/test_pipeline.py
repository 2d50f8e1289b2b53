"""The batch path's handling of jobs whose request is gone before their batch runs: dropped
untouched (their version may be retired already), the others still served."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from cascade_server.gateway.batcher import Job
from cascade_server.gateway.metrics import Metrics
from cascade_server.gateway.pipeline import BatchPath


class Retired:
    """A version whose sessions are closed: any use is a bug."""

    def __getattr__(self, name):
        raise AssertionError(f"a retired version was used ({name})")


def test_jobs_cancelled_while_queued_are_dropped_before_any_model_runs():
    async def main():
        loop = asyncio.get_running_loop()
        path = BatchPath("toy", 10, teacher=None, metrics=Metrics(), threshold=lambda v: 0.5)
        ran = []
        path._run = lambda version, jobs: ran.append((version, jobs))
        gone = [Job(SimpleNamespace(version=Retired()), 1, loop.create_future()) for _ in range(3)]
        for job in gone:
            job.future.cancel()  # the client disconnected while it queued
        path(gone)
        assert ran == []  # nothing ran: the retired version was never touched
        live_version = object()
        live = Job(SimpleNamespace(version=live_version), 2, loop.create_future())
        path([gone[0], live, gone[1]])
        assert ran == [(live_version, [live])]

    asyncio.run(main())


def test_one_versions_failure_fails_only_its_own_requests():
    """Around a swap a batch holds two versions: the old one's failure is its requests' error,
    the new one's requests are still run."""

    async def main():
        loop = asyncio.get_running_loop()
        path = BatchPath("toy", 10, teacher=None, metrics=Metrics(), threshold=lambda v: 0.5)
        old, new = object(), object()
        ran = []

        def run(version, jobs):
            if version is old:
                raise RuntimeError("the old sessions are closed")
            ran.append(jobs)

        path._run = run
        a = Job(SimpleNamespace(version=old), 1, loop.create_future())
        b = Job(SimpleNamespace(version=new), 1, loop.create_future())
        path([a, b])
        assert isinstance(a.future.exception(), RuntimeError)
        assert ran == [[b]] and not b.future.done()  # b is answered by its own run

    asyncio.run(main())
