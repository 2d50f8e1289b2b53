"""The micro-batcher on its own: batches form from concurrent submissions, within the knobs."""

import asyncio

import pytest
from pydantic import ValidationError

from cascade_server.gateway.batcher import BatchingConfig, Job, MicroBatcher


class Recorder:
    """A `run` that answers each job with its payload doubled and records the batch sizes."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.fail = fail

    def __call__(self, jobs: list[Job[int, int]]) -> None:
        self.batches.append([job.payload for job in jobs])
        if self.fail:
            raise RuntimeError("model exploded")
        for job in jobs:
            job.future.set_result(job.payload * 2)


def run(coro):
    return asyncio.run(coro)


async def _submit_all(batcher, payloads, sizes=None):
    sizes = sizes or [1] * len(payloads)
    return await asyncio.gather(
        *(batcher.submit(p, s) for p, s in zip(payloads, sizes, strict=True))
    )


def test_concurrent_submissions_form_one_batch_answered_in_order():
    async def main():
        rec = Recorder()
        batcher = MicroBatcher(rec, BatchingConfig(max_items=64))
        batcher.start()
        answers = await _submit_all(batcher, list(range(10)))
        await batcher.close()
        return rec, answers

    rec, answers = run(main())
    assert rec.batches == [list(range(10))]
    assert answers == [2 * i for i in range(10)]


def test_max_items_splits_batches_and_a_large_job_runs_alone():
    async def main():
        rec = Recorder()
        batcher = MicroBatcher(rec, BatchingConfig(max_items=4))
        batcher.start()
        await _submit_all(batcher, list(range(10)))
        await _submit_all(batcher, [100, 101], sizes=[9, 1])
        await batcher.close()
        return rec

    rec = run(main())
    assert rec.batches[:3] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert rec.batches[3:] == [[100], [101]]  # 9 items > max_items: alone, never split


def test_max_wait_lets_later_requests_join():
    async def main(wait):
        rec = Recorder()
        batcher = MicroBatcher(rec, BatchingConfig(max_items=8, max_wait_s=wait))
        batcher.start()

        async def late(p):
            await asyncio.sleep(0.005)
            return await batcher.submit(p, 1)

        await asyncio.gather(batcher.submit(0, 1), late(1))
        await batcher.close()
        return rec

    assert run(main(0.0)).batches == [[0], [1]]
    assert run(main(0.08)).batches == [[0, 1]]


def test_a_failing_batch_fails_its_jobs_and_the_collector_lives_on():
    async def main():
        rec = Recorder(fail=True)
        batcher = MicroBatcher(rec, BatchingConfig())
        batcher.start()
        results = await asyncio.gather(
            *(batcher.submit(i, 1) for i in range(3)), return_exceptions=True
        )
        rec.fail = False
        after = await batcher.submit(7, 1)
        await batcher.close()
        return results, after

    results, after = run(main())
    assert all(isinstance(r, RuntimeError) for r in results)
    assert after == 14


def test_submit_before_start_and_after_close_are_refused():
    async def main():
        batcher = MicroBatcher(Recorder(), BatchingConfig())
        with pytest.raises(RuntimeError, match="before start"):
            await batcher.submit(1, 1)

    run(main())


@pytest.mark.parametrize(
    "knobs", [{"max_items": 0}, {"max_wait_s": -1}, {"max_wait_s": 5}, {"max_itemz": 3}]
)
def test_knobs_are_validated(knobs):
    with pytest.raises(ValidationError):
        BatchingConfig(**knobs)


def test_a_dead_collector_fails_what_waits_and_is_restarted(caplog):
    """If the collector task itself dies (a bug outside a batch), the requests queued behind it
    must not wait forever: they fail, and the next submission is served by a new collector."""

    async def main():
        rec = Recorder()
        batcher = MicroBatcher(rec, BatchingConfig(max_items=64))
        batcher.start()
        take = batcher._take
        broken = {"once": True}

        def take_once_broken():
            if broken.pop("once", False):
                raise RuntimeError("collector bug")
            return take()

        batcher._take = take_once_broken
        waiting = await asyncio.wait_for(
            asyncio.gather(batcher.submit(1, 1), return_exceptions=True), timeout=2
        )
        answer = await asyncio.wait_for(batcher.submit(2, 1), timeout=2)
        await batcher.close()
        return waiting, answer

    waiting, answer = run(main())
    assert isinstance(waiting[0], RuntimeError) and "collector died" in str(waiting[0])
    assert answer == 4
    assert "collector died" in caplog.text and "restarting" in caplog.text
